"""Seeing inside images, layers and containers (``docs/inspect.md``).

================  =================================================================
:mod:`.index`     per-layer file indexes: read once (tar-split record or driver diff),
                  kept in the metastore for read-only layers
:mod:`.stack`     a stack of indexes: what each path is at each layer and why; the
                  change marks dive colours; dive's efficiency and wasted space
:mod:`.targets`   what the commands look at: an image, a layer chain, a container
:mod:`.explain`   ``layerfs explain``: serving layer, hidden copies, driver facts,
                  aufs lookup cost (computed, and counted on a live union)
:mod:`.diff`      ``layerfs image diff``
:mod:`.explore`   ``layerfs image explore``: the analysis, ``--json``, ``--ci``
:mod:`.tui`       the explorer's terminal UI (textual; imported only to run it)
================  =================================================================
"""
