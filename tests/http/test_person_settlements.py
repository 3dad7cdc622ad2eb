"""线上快速理赔 over HTTP: the person's settlements in the requested period, only the fields
the policy releases for the purpose and the consented datatypes."""

from __future__ import annotations

import duckdb
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gateway.query.store import StoreLayout
from gateway.synth import CityFiles
from tests.conftest import Env, LoadedStore
from tests.http.persons import (
    SETTLEMENTS,
    Insurer,
    call,
    consent_body,
    give_consent,
    sample_persons,
)

NEVER = {"psn_no", "psn_id", "certno", "psn_name", "tel", "addr", "dise_name", "setl_id",
         "mdtrt_id"}


def test_settlements_of_the_consented_period_with_released_fields(env: Env,
                                                                  city: CityFiles) -> None:
    person = sample_persons(city, 1)[0]
    raw = pq.read_table(city.settlements)
    psn_no = pq.read_table(city.persons, columns=["psn_no", "certno"]).filter(
        pc.equal(pc.field("certno"), person.certno)).column("psn_no")[0].as_py()
    mine = raw.filter(pc.equal(raw.column("psn_no"), psn_no)).to_pylist()
    years = sorted({row["setl_time"].year for row in mine})
    year = years[0]
    expected = sorted((r for r in mine if r["setl_time"].year == year),
                      key=lambda r: r["setl_time"])

    insurer = Insurer()
    issued = give_consent(env, consent_body(person, insurer, purpose="claims_fast_track",
                                            period=(f"{year}-01-01", f"{year}-12-31")))
    token = env.token("insurer")
    body = {"datatypes": ["settlements.summary", "settlements.amounts",
                          "settlements.diagnosis_category"],
            "period": {"start": f"{year}-01-01", "end": f"{year}-12-31"}}
    before = env.gateway.audit.size()
    response = call(env, SETTLEMENTS, token, issued["token"],
                    insurer.proof(token, path=SETTLEMENTS), body)
    assert response.status_code == 200, response.text
    answer = response.json()
    released = {"setl_date", "med_type", "hosp_lv", "dise_category", "medfee_sumamt",
                "inscp_scp_amt", "fulamt_ownpay_amt", "overlmt_selfpay", "hifp_pay",
                "hifmi_pay", "maf_pay", "psn_part_amt"}
    assert set(answer["fields"]) == released
    assert len(answer["settlements"]) == len(expected) > 0
    for got, want in zip(answer["settlements"], expected, strict=True):
        assert set(got) == released
        assert got["setl_date"] == want["setl_time"].date().isoformat()
        # the diagnosis only as its ICD-10 category
        assert got["dise_category"] == want["dise_codg"][:3]
        assert abs(got["medfee_sumamt"] - float(want["medfee_sumamt"])) < 0.005
    assert not NEVER & set(answer["settlements"][0])
    for raw_value in (person.certno, psn_no, str(person.psn_id)):
        assert raw_value not in response.text
    entry = env.gateway.audit.get(before)
    assert (entry.action, entry.decision, entry.consent_id) == (
        "persons.settlements", "allow", issued["consent_id"])
    assert entry.fields == answer["fields"]

    # Fewer datatypes asked, fewer fields released; the consent is reusable (not single use).
    narrow = {**body, "datatypes": ["settlements.summary"],
              "period": {"start": f"{year}-01-01", "end": f"{year}-06-30"}}
    response = call(env, SETTLEMENTS, token, issued["token"],
                    insurer.proof(token, path=SETTLEMENTS), narrow)
    assert response.status_code == 200, response.text
    assert response.json()["fields"] == ["setl_date", "med_type", "hosp_lv"]
    assert all(r["setl_date"] <= f"{year}-06-30" for r in response.json()["settlements"])


def test_the_store_holds_the_keyed_lookup_never_a_certno(loaded_store: LoadedStore,
                                                         city: CityFiles) -> None:
    layout = StoreLayout(loaded_store.store_dir)
    version = layout.current_version()
    assert version is not None
    data = layout.version_path(version).read_bytes()
    certnos = pq.read_table(city.persons, columns=["certno"]).column("certno").to_pylist()
    for certno in certnos[:200]:
        assert certno.encode() not in data
    person = sample_persons(city, 1)[0]
    with duckdb.connect(str(layout.version_path(version)), read_only=True) as con:
        rows = con.execute("SELECT psn_id FROM person_lookup WHERE lookup = ?",
                           [person.lookup]).fetchall()
        total = con.execute("SELECT count(*), count(DISTINCT lookup) FROM person_lookup"
                            ).fetchall()[0]
    assert rows == [(person.psn_id,)]
    assert total == (len(certnos), len(certnos))
