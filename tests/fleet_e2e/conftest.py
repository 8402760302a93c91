"""The world every end-to-end module of this package shares: one puppetserver start for all."""

from tests.fleet_e2e.world import master, world

__all__ = ["master", "world"]
