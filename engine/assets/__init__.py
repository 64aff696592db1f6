"""Vendored browser assets (d3 5.7.0, jQuery 2.2.4) for offline bertviz; licences alongside."""
