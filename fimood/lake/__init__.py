"""The lake: where rows come from and where scores go, over any fsspec URL.

`sources` lists partitions and plans reads; `images` decodes image cells; `tables` reads and writes
image tables; `score_table` commits partitions of the score table whole (`delta`: Delta Lake tables over
the same URLs; `staging`: a run's rows before their commit); `schema` declares its columns.
"""
