"""Our own operators: cuda_bn's Triton kernels (``batchnorm``, each held by the tests to a
plain-PyTorch reference), and the plain-PyTorch BatchNorm pieces that every BatchNorm here shares
(``bn_stats``, ``sync_collectives``)."""
