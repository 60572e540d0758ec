"""(gold, completion, expected outcome) cases for the math verifier; imported by the tests."""

B = "\\boxed"
CASES = [
    # integers, boxed and unboxed
    ("72", r"So she sold \boxed{72} clips.", "ok"),
    ("72", r"\boxed{73}", "wrong"),
    ("72", "The answer is 72.", "ok"),
    ("72", "The answer is 27.", "wrong"),
    ("72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", "ok"),
    ("1234", "#### 1,234", "ok"),
    ("1234", r"\boxed{1,234}", "ok"),
    ("-4", r"\boxed{-4}", "ok"),
    ("-4", r"\boxed{4}", "wrong"),
    ("0", r"\boxed{0}", "ok"),
    ("5", "Answer: 5", "ok"),
    ("5", "Final answer: $5$", "ok"),
    # fractions, decimals, LaTeX vs plain
    (r"\frac{1}{2}", r"\boxed{\frac12}", "ok"),
    (r"\frac{1}{2}", r"\boxed{0.5}", "ok"),
    (r"\frac{1}{2}", r"\boxed{1/2}", "ok"),
    (r"\frac{1}{2}", r"\boxed{\dfrac{1}{2}}", "ok"),
    (r"\frac{1}{2}", r"\boxed{\tfrac{2}{4}}", "ok"),
    (r"\frac{1}{3}", r"\boxed{0.33}", "wrong"),
    (r"\frac{1}{2}", r"\boxed{\frac{1}{3}}", "wrong"),
    ("0.25", r"\boxed{\frac{1}{4}}", "ok"),
    ("3/4", r"\boxed{\frac{3}{4}}", "ok"),
    (r"-\frac{3}{4}", r"\boxed{-0.75}", "ok"),
    ("2.5", r"\boxed{\frac{5}{2}}", "ok"),
    # radicals, pi, expressions
    (r"\sqrt{2}", r"\boxed{\sqrt 2}", "ok"),
    (r"2\sqrt{2}", r"\boxed{\sqrt{8}}", "ok"),
    (r"\sqrt{2}", r"\boxed{\sqrt{3}}", "wrong"),
    (r"\frac{\sqrt{3}}{2}", r"\boxed{\frac{1}{2}\sqrt{3}}", "ok"),
    (r"2\pi", r"\boxed{2 \pi}", "ok"),
    (r"\pi", r"\boxed{3}", "wrong"),
    ("x^2+1", r"\boxed{1+x^2}", "ok"),
    ("(x+1)^2", r"\boxed{x^2+2x+1}", "ok"),
    ("x^2+1", r"\boxed{x^2-1}", "wrong"),
    ("2x", r"\boxed{2y}", "wrong"),
    ("e^{2}", r"\boxed{e^2}", "ok"),
    ("10^{3}", r"\boxed{1000}", "ok"),
    # sets, tuples, intervals
    (r"\{1,2\}", r"\boxed{\{2,1\}}", "ok"),
    (r"\{1,2\}", r"\boxed{\{1,3\}}", "wrong"),
    ("[1,3)", r"\boxed{[1,3)}", "ok"),
    ("[1,3)", r"\boxed{[1,3]}", "wrong"),
    ("(1,2]", r"\boxed{(1,2]}", "ok"),
    (r"(-\infty, 0)", r"\boxed{(-\infty,0)}", "ok"),
    (r"(-\infty, 0)", r"\boxed{(0,\infty)}", "wrong"),
    (r"[0,1] \cup [2,3]", r"\boxed{[2,3]\cup[0,1]}", "ok"),
    ("(1, 2)", r"\boxed{(1,2)}", "ok"),
    ("3, 5", r"\boxed{5, 3}", "ok"),
    # equations and relations
    ("x=3", r"\boxed{x=3}", "ok"),
    ("3", r"\boxed{x=3}", "ok"),
    ("x=3", r"\boxed{x=4}", "wrong"),
    # units, percent, text, degrees
    ("5", r"\boxed{5\text{ cm}}", "ok"),
    (r"5\text{ cm}", r"\boxed{5}", "ok"),
    ("18", r"\boxed{\$18}", "ok"),
    ("18", r"\boxed{18 \text{ dollars}}", "ok"),
    ("30", r"\boxed{30^\circ}", "ok"),
    ("10", r"\boxed{10\%}", "ok"),
    (r"\text{(B)}", r"\boxed{\text{(B)}}", "ok"),
    # multiple boxes (math-verify's rule, docs/rewards.md): boxes far apart -> the last one alone;
    # close together or joined by and/or/,/; -> one answer, graded as a set
    ("7", r"First \boxed{3}. Then I noticed the slip in step two. So the result changes to \boxed{7}", "ok"),
    ("3", r"First \boxed{3}. Then I noticed the slip in step two. So the result changes to \boxed{7}", "wrong"),
    ("7", r"First \boxed{3}, then corrected: \boxed{7}", "wrong"),  # the comma joins them: {3, 7}
    (r"\{3, 7\}", r"First \boxed{3}, then corrected: \boxed{7}", "ok"),
    ("7", r"\boxed{7} and the check \boxed{7}", "ok"),
    # no answer / malformed
    ("7", "I am not sure.", "wrong"),
    ("7", "", "wrong"),
    ("7", r"\boxed{}", "wrong"),
    ("7", r"the result is \boxed{7", "wrong"),
    ("7", r"\boxed{\frac{}{}}", "wrong"),
    # boxed wins over other mentions
    ("12", r"The answer is 11. Actually \boxed{12}", "ok"),
    ("11", r"The answer is 11. Actually \boxed{12}", "wrong"),
    # matrices
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", "ok"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\boxed{\begin{pmatrix} 2 \\ 1 \end{pmatrix}}", "wrong"),
    # large but benign numbers
    ("123456789012345678901234567890", r"\boxed{123456789012345678901234567890}", "ok"),
    ("123456789012345678901234567890", r"\boxed{123456789012345678901234567891}", "wrong"),
]
