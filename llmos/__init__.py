"""``llmos``: use a workbench from code, in this process or over HTTP (see ``llmos.client``)."""
