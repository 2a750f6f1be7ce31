"""The lake: where rows come from and where scores go, over any fsspec URL.

`sources` lists partitions and plans reads; `images` decodes image cells; `tables` reads and writes
image tables; `commit` commits output partitions whole and reads what is committed.
"""
