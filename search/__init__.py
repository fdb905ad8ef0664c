"""Network search over a super-network (the ``Supernet`` contract of ``backbones.base``): evolution (ViT-ResNAS) and
MES pruning (EfficientFormerV2), the sandwich rule of super-network training, latency tables, the hold-out data
and one writer of the results. Run by ``python -m tasks.search``."""
