"""``clip-tao serve``: embeddings and search over HTTP, in Triton's protocol and in plain JSON."""
