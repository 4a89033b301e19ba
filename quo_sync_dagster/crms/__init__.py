"""One module per CRM. Importing this package imports (and so registers) every connector."""

import importlib
import pkgutil

from quo_sync_dagster.crms.base import CRMConnector, connector_class, registered_connectors

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["CRMConnector", "connector_class", "registered_connectors"]
