"""Network search over any super-network (the ``Supernet`` contract of ``backbones.base``): evolution and MES pruning,
the sandwich rule of super-network training, costs and budgets, latency tables, the hold-out data and one writer of
the results. Run by ``python -m tasks.search``."""
