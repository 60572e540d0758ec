"""The learner: the policy model (backbone + MTP heads), objectives, the optimisation step,
checkpoints. Imports nothing of ours outside itself."""
