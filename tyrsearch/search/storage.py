"""The study storage: an Optuna RDB storage (SQLite embedded, PostgreSQL for many workers) with the
heartbeat on, so that a dead worker's trials are failed and queued again for another worker."""

from __future__ import annotations

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from tyrsearch.errors import UserError

HEARTBEAT_S = 10.0  # a worker beats this often; silent for GRACE times as long, its trials are retried
GRACE = 3


def redact(url: str) -> str:
    """The URL as it may be printed: the password masked."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.split("@")[-1]


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def open_storage(url: str, *, heartbeat_s: float = HEARTBEAT_S) -> RDBStorage:
    """Connect to the storage (creating its tables if new). Trouble (no such server, wrong password,
    unknown driver) is one UserError that never shows the password."""
    interval = max(1, round(heartbeat_s))  # Optuna counts whole seconds
    try:
        return RDBStorage(url, heartbeat_interval=interval, grace_period=interval * GRACE,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                              inherit_intermediate_values=True))
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        password = _password(url)
        if password:
            reason = reason.replace(password, "***")
        raise UserError(f"cannot open the study storage {redact(url)}: {reason}; check the URL, that the "
                        "database server runs and accepts these credentials") from None


def _password(url: str) -> str | None:
    try:
        return sqlalchemy.engine.make_url(url).password
    except sqlalchemy.exc.ArgumentError:
        return None


def load_study(storage: RDBStorage, name: str, **kwargs) -> optuna.Study:
    """An existing study, or a UserError that lists the studies there."""
    try:
        return optuna.load_study(study_name=name, storage=storage, **kwargs)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise UserError(f"no study {name!r} in the storage (it has: {', '.join(names) or 'none'}); start one "
                        "with `tyrsearch search --runner optuna --study NAME ...`") from None
