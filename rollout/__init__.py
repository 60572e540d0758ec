"""Rollout: vLLM engines (as Ray actors) generating with MTP speculative drafting."""
