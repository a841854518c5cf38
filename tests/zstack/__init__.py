"""Compatibility fixtures: each command sent exactly as the ZStack management node sends it.

Every body here is written from the MN's Java command class (Gson: null objects left out,
primitives always present), and each test names the source file it comes from. The MN calls
through ``RESTFacade.asyncJsonPost`` (taskuuid + callbackurl, the HTTP body ignored, the
result read from the callback) or ``syncJsonPost``; :func:`mn_async` and :func:`mn_sync` do
the same. Assertions are on the reply fields the MN reads (``../shared/ZSTACK-WIRE.md``).
"""
