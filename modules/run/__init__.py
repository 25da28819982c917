"""The machinery every train script shares, one job per module. ``modules.training``
re-exports all of it (the scripts import from there); see its docstring for the map."""
