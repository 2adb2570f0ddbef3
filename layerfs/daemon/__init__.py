"""``layerfs daemon``: warm commands for one root (issue 17).

:mod:`.client` (the thin client every ``layerfs`` starts with) and :mod:`.wire`
import only the standard library; :mod:`.server` is the supervisor,
:mod:`.worker` what runs one command, :mod:`.services` the hosted servers,
:mod:`.command` the ``layerfs daemon`` command. docs/daemon.md has the design.
Nothing is imported here: the thin client must stay cheap.
"""
