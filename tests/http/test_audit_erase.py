"""`gateway audit erase --subject`: a person's personal data leaves the audit log, the log still
verifies (locally and as an exported bundle), and the erasure is itself audited."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.audit import SqliteAuditLog
from tests.conftest import Env
from tests.http.test_cli import _run


def test_erase_removes_the_persons_data_and_is_audited(env: Env, tmp_path: Path) -> None:
    auditor = env.gateway.tokens.verify(env.token("auditor"))
    for i in range(4):
        env.gateway.record(auditor, "persons.enrollment", status=200, decision="allow",
                           subject_pseudonym=f"psn-erase-{i % 2}", consent_id=f"cst-{i}")
    env.gateway.audit.close()  # the operator's command opens the store itself
    workdir = str(env.settings.workdir)

    result = _run("audit", "erase", "--subject", "psn-erase-1", "--workdir", workdir)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["erased"] == 2
    with SqliteAuditLog(env.settings.audit_path) as log:
        assert log.search(subject_pseudonym="psn-erase-1") == []
        assert len(log.search(subject_pseudonym="psn-erase-0")) == 2
        erase_entry = log.get(answer["audit_id"])
        assert erase_entry.action == "audit.erase"
        assert erase_entry.request == {"erased_indexes": answer["indexes"]}
        assert all("psn-erase-1" not in row.entry_json for row in log.iter_rows())
        size = log.verify()

    bundle = tmp_path / "after.json"
    assert _run("audit", "export", str(bundle), "--workdir", workdir).returncode == 0
    verified = _run("audit", "verify", str(bundle), "--public-key",
                    str(bundle.with_suffix(".pub.pem")))
    assert verified.returncode == 0, verified.stderr
    assert f"{size} entries verified" in verified.stdout
    assert "psn-erase" not in bundle.read_text("utf-8")
