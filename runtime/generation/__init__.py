"""The diffusion loop and what feeds it: prompts to embeddings, the batch, the KV cache and its refresh policy,
remasking."""
