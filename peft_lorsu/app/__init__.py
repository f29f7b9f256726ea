"""The application built on the plugin core: the ``peft-lorsu`` command, the continual-session runner, the demo,
the data sources and domain shifts, the plots, and the small models used by examples and smoke tests.

Nothing in the core (``peft_lorsu`` outside this package) imports it; see ``docs/architecture.md``.
"""
