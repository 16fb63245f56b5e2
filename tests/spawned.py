"""Gloo process groups for test files that run ranks in spawned processes: the harness of
test_class_parallel.py (_Group: the processes start once per world size and serve every test of the
file), one pool per test file, closed by the file's module-scoped fixture, which fails unless every
worker exits with status 0."""
from test_class_parallel import _Group


class Pool:
    def __init__(self):
        self.groups = {}

    def spawn(self, fn, world, *args):
        """Run fn(rank, world, *args) on every rank of a `world`-process gloo group (fn at module level:
        spawn pickles it by name); a failure on any rank fails the test with that rank's traceback."""
        g = self.groups.get(world)
        if g is None or not g.alive():
            g = self.groups[world] = _Group(world)
        g.run(fn, *args)

    def close(self):
        codes = {world: g.close() for world, g in self.groups.items() if not g.forced}
        self.groups.clear()
        assert all(c == 0 for v in codes.values() for c in v), f"workers did not exit cleanly: exit codes {codes}"
