"""``import coop.dassl_plugin`` in a Dassl ``train.py`` registers this package into Dassl:
every trainer and dataset, the config keys, the log and the torch fixes
(:func:`coop.dassl_bridge.register_into_dassl`). Importing it is the registration, as
``import trainers.coop`` is in the official CoOp repository."""

from coop.dassl_bridge import register_into_dassl

register_into_dassl()
