"""DAPO's overlong reward shaping (Yu et al. 2025, §3.4, Eq. 13): the one definition of its bounds.

Two places apply it: the learner (`algorithm.dapo.overlong_*`, on token counts, in
`learner.advantages.overlong_penalty`) and the math grader (`reward.config.MathConfig.overlong`,
on whatever lengths its caller passes). Both validate through `OverlongShaping` here, so a value
one accepts the other accepts too. Pure pydantic (no torch): the reward package's verifier
processes import it, and it is the one module of ours the reward package imports (the learner
stays a leaf; docs/rewards.md says so).

    >>> OverlongShaping(max_length=20, cache_length=4).penalty(18)
    -0.5
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: L_max: the hard response-length limit; responses past it get the full −1.
OverlongMaxLength = Annotated[int, Field(gt=0)]
#: L_cache: the band before L_max over which the penalty ramps linearly from 0 to −1.
OverlongCacheLength = Annotated[int, Field(gt=0)]


def check_overlong_lengths(max_length: int, cache_length: int, *, max_name: str = "max_length",
                           cache_name: str = "cache_length") -> None:
    """The cross-field rule, raising ValueError with the caller's field names and values.

    L_cache < L_max: L_max − L_cache is DAPO's "expected maximum length", the longest response
    that goes unpunished; at 0 every response would be penalised by its length alone.
    """
    if cache_length >= max_length:
        raise ValueError(f"{cache_name}={cache_length} must be smaller than {max_name}={max_length}: the "
                         f"penalty ramps over the last {cache_name} tokens before {max_name}, so at least "
                         "one length must go unpunished")


class OverlongShaping(BaseModel):
    """DAPO overlong shaping: 0 if |y| ≤ L_max − L_c, ((L_max − L_c) − |y|) / L_c if |y| ≤ L_max, −1 beyond."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_length: OverlongMaxLength = Field(description="L_max: the hard response-length limit (tokens if the "
                                                      "caller passes token counts, else characters).")
    cache_length: OverlongCacheLength = Field(description="L_c: the soft band before L_max in which the "
                                                          "penalty ramps linearly from 0 to -1; < max_length.")

    @model_validator(mode="after")
    def _check(self) -> OverlongShaping:
        check_overlong_lengths(self.max_length, self.cache_length)
        return self

    def penalty(self, length: int) -> float:
        """The penalty added to the reward of a response of ``length``: in [−1, 0]."""
        soft = self.max_length - self.cache_length
        if length <= soft:
            return 0.0
        if length <= self.max_length:
            return (soft - length) / self.cache_length
        return -1.0
