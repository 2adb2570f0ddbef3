"""The defaults of ``image explore --ci``'s rules (dive's defaults), with no imports.

The CLI builds ``image explore``'s options from these when it draws ``--help``, so they
live apart from :mod:`.explore`, which pulls in the index and the image store.
"""

DISABLED = "disabled"
DEFAULT_LOWEST_EFFICIENCY = "0.9"
DEFAULT_HIGHEST_WASTED_BYTES = DISABLED
DEFAULT_HIGHEST_USER_WASTED_PERCENT = "0.1"
