"""Loading a dataset from a hub name, a data file, or a folder saved with `datasets`."""

from __future__ import annotations

import os

from datasets import DatasetDict, load_dataset, load_from_disk

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_any(name: str, config: str | None = None) -> DatasetDict:
    """A DatasetDict from `name`: a json/jsonl/parquet/csv file (its rows become "train"), a saved folder, or a hub
    dataset. A missing dataset is a ValueError that says what was looked for."""
    extension = os.path.splitext(name)[1].lower()
    if os.path.isfile(name):
        if extension not in FILE_BUILDERS:
            raise ValueError(f"dataset file {name} has extension {extension!r}; use one of {sorted(FILE_BUILDERS)}")
        return load_dataset(FILE_BUILDERS[extension], data_files={"train": name})
    if os.path.isdir(name) and any(os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
        loaded = load_from_disk(name)
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if extension in FILE_BUILDERS and not os.path.exists(name):
        raise ValueError(f"dataset file {name} does not exist")
    try:
        return load_dataset(name, name=config)
    except Exception as error:  # datasets raises many types for a missing dataset; report one line
        raise ValueError(f"could not load dataset {name!r}: {str(error).splitlines()[0]}") from None


def eval_split(dataset: DatasetDict, preferred: str) -> str | None:
    """The evaluation split: the preferred test split, else "validation", else "dev", else none."""
    return next((s for s in (preferred, "validation", "dev") if s in dataset), None)
