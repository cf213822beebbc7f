"""Where to look: links into the MLflow UI for an experiment's runs and a compare view of some of them."""

from __future__ import annotations

import json

# What `mlflow ui --backend-store-uri <database uri>` (and a bare `mlflow server`) serves by default.
LOCAL_UI_BASE = "http://127.0.0.1:5000"
# MLflow's SQLAlchemy stores: a database, not a server, so the UI is whatever `mlflow ui` the user starts on it.
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def ui_urls(
    tracking_uri: str, experiment_id: str, run_ids: list[str] | None = None, *, ui_base: str | None = None
) -> dict[str, str]:
    """Links into the MLflow UI (MLflow 3.17; its pages are hash routes of one single-page app):

    - ``"runs"``: the experiment's runs table, ``<base>/#/experiments/<experiment_id>/runs`` (a bare
      ``mlflow ui`` lands on a GenAI overview page instead; a sweep's trials sit nested under its parent run);
    - ``"compare"``, only when ``run_ids`` is given and not empty: the compare view of those runs (params,
      metrics side by side), ``<base>/#/compare-runs?runs=<JSON list of run ids>&experiments=<JSON list of
      experiment ids>``, the JSON lists percent-encoded (the route the UI's own Compare button opens).

    The base: ``ui_base`` when given (an SSH tunnel, a proxy); else, for an ``http(s)://`` tracking URI, that
    server itself (its path prefix kept, any ``user:password@`` dropped so no secret lands in a log); for a
    database URI (``sqlite:////abs/mlflow.db``, ``postgresql://...``) ``http://127.0.0.1:5000``, which is where
    ``mlflow ui --backend-store-uri <tracking_uri>`` serves it (start that first; ``--port`` moves it: then pass
    ``ui_base``).
    """
    from urllib.parse import quote, urlsplit, urlunsplit

    if ui_base is None:
        parts = urlsplit(tracking_uri)
        if parts.scheme in ("http", "https"):
            netloc = parts.hostname or ""
            if ":" in netloc:  # an IPv6 literal
                netloc = f"[{netloc}]"
            if parts.port is not None:
                netloc += f":{parts.port}"
            ui_base = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        elif parts.scheme.split("+", 1)[0] in _DATABASE_SCHEMES:
            ui_base = LOCAL_UI_BASE
        else:
            raise ValueError(
                f"no MLflow UI address is known for tracking uri {tracking_uri!r}; FIX THIS by passing "
                "ui_base='http://host:port' (where your MLflow UI is served)"
            )
    experiment_id = str(experiment_id)
    if not experiment_id:
        raise ValueError("ui_urls needs the experiment id (MlflowClient.get_experiment_by_name(name).experiment_id)")
    root = ui_base.rstrip("/") + "/#"
    urls = {"runs": f"{root}/experiments/{quote(experiment_id, safe='')}/runs"}
    if run_ids:
        as_json = lambda ids: quote(json.dumps([str(i) for i in ids], separators=(",", ":")), safe="")  # noqa: E731
        urls["compare"] = f"{root}/compare-runs?runs={as_json(run_ids)}&experiments={as_json([experiment_id])}"
    return urls

