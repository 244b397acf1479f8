"""Durable usage history: samples, hour and day rollups, reroute cooldowns.

:class:`~ccpd.store.interface.IStore` is what the rest of ccpd relies on;
:class:`~ccpd.store.sqlite.SQLiteStore` implements it (a file, or ``:memory:`` when
``[store] persist = false``). The request path never waits on it:
:class:`~ccpd.store.writer.SampleWriter` batches samples in the background. ``schema`` and
``queries`` are stdlib-only, so the ``ccp db`` commands run without Twisted.
"""
