"""Built-in capability plugins, installed as the package ``kvmagent.plugins``.

Each module exposes ``plugin`` (a :class:`kvmagent.plugin.Plugin`) and is listed under the
``kvmagent.plugins`` entry-point group in setup.cfg.
"""
