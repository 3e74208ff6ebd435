"""Other places to run the Pool API than this machine's worker processes.

Each backend lives in its own module and is imported explicitly, so that ``import procpool``
never pays for (or requires) a cluster library:

* :mod:`procpool.backends.dask` -- :class:`~procpool.backends.dask.DaskPool`, the ``Pool`` API
  on a Dask cluster (``pip install 'procpool[dask]'``).
"""
