"""Data sets as arrays in memory: ``datasets`` (the registry, ``get_dataset``: the bundled digits,
MNIST, text, synthetic tasks), ``mnist`` (the IDX files, download and checksums) and ``synthetic``
(the adding and copy problems). Imports nothing else of jaxmodels.
"""
