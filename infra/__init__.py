"""The outside world: settings, store schema and I/O, FITS readers, Dask, MLflow, Prefect."""
