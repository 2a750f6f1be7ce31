"""The lake: where rows come from and where scores go, over any fsspec URL.

`sources` lists partitions and plans reads; `images` decodes image cells; `tables` reads and writes
image tables; `score_table` writes the score table's files and commits its partitions whole (`delta`: Delta
Lake tables over the same URLs); `schema` declares its columns.
"""
