"""Experiments and the report. Needs the ``report`` extra (matplotlib, tqdm, mlxtend)."""


def require(module: str) -> None:
    """Import ``module`` or raise an ImportError naming the extra to install."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"bnkit's report needs {module!r}: install the extra with "
            "pip install 'bnkit[report]' (or pip install -e '.[report]' in a checkout)"
        ) from exc
