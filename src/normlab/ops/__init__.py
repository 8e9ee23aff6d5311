"""Our own GPU operators (Triton), each with a plain-PyTorch reference the tests hold it to."""
