# METADATA
# title: Tests of the gateway authorization decision
# description: >-
#   Every deny reason, each next to the allow it guards. The data is mocked with `with`, so
#   these tests never depend on what the gateway has loaded. Helpers and fixtures use names
#   that no local variable reuses (regorus refuses a local that shadows a rule).
package gateway.authz_test

import data.gateway.authz

# --- fixtures ----------------------------------------------------------------------------

t0 := 1763800000000000000

day_ns := 86400000000000

catalog := {
	"datasets": {
		"settlements": {
			"dimensions": ["age_band", "gend", "insu_admdvs", "insutype", "year", "med_type", "hosp_lv"],
			"measures": ["medfee_sumamt", "hifp_pay", "acct_pay", "psn_part_amt"],
		},
		"person_years": {
			"dimensions": ["age_band", "gend", "insu_admdvs", "insutype", "year"],
			"measures": ["exposure", "medfee_sumamt"],
		},
	},
	"purposes": {
		"hmb_pricing": {"necessary_fields": [
			"age_band", "gend", "insu_admdvs", "insutype", "year", "med_type", "hosp_lv",
			"exposure", "medfee_sumamt", "hifp_pay", "psn_part_amt",
		]},
		"claims_fast_track": {"necessary_fields": ["year", "med_type", "hosp_lv", "medfee_sumamt"]},
	},
	"defaults": {"min_cell_size": 10, "min_cell_size_floor": 5, "max_rows": 10000},
}

# acct_pay is granted but not necessary for hmb_pricing: the purpose must still refuse it.
grant_g1 := {
	"grant_id": "g-1",
	"insurer": "ins-001",
	"purpose": "hmb_pricing",
	"datasets": ["settlements"],
	"dimensions": ["age_band", "gend", "insu_admdvs", "year"],
	"measures": ["medfee_sumamt", "hifp_pay", "acct_pay"],
	"filters": {"insu_admdvs": ["420100", "420200"]},
	"min_cell_size": 3,
	"max_rows": 50000,
	"valid_from_ns": t0 - day_ns,
	"valid_until_ns": t0 + day_ns,
	"revoked": false,
}

# Another insurer's wider grant: it must never serve ins-001.
grant_g9 := object.union(grant_g1, {
	"grant_id": "g-9",
	"insurer": "ins-002",
	"datasets": ["settlements", "person_years"],
	"dimensions": ["age_band", "gend", "insu_admdvs", "year", "hosp_lv"],
	"measures": ["medfee_sumamt", "hifp_pay", "psn_part_amt"],
})

fixture_grants := {"g-1": grant_g1, "g-9": grant_g9}

query := {
	"subject": {"client_id": "c-1", "role": "insurer", "org": "ins-001"},
	"action": "query.aggregate",
	"purpose": "hmb_pricing",
	"resource": {
		"dataset": "settlements",
		"dimensions": ["gend", "age_band"],
		"measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "medfee_sumamt"}],
		"filters": {"insu_admdvs": ["420100"]},
		"fields": ["gend", "age_band", "medfee_sumamt", "insu_admdvs"],
	},
	"time_ns": t0,
}

# --- helpers -----------------------------------------------------------------------------

decide(inp) := result if {
	result := authz.decision with input as inp
		with data.gateway.catalog as catalog
		with data.gateway.grants as fixture_grants
}

decide_grants(inp, grant_docs) := result if {
	result := authz.decision with input as inp
		with data.gateway.catalog as catalog
		with data.gateway.grants as grant_docs
}

# The path the engine adapter takes: with the derived {insurer: {purpose: [ids]}} index.
decide_indexed(inp, grant_docs, index) := result if {
	result := authz.decision with input as inp
		with data.gateway.catalog as catalog
		with data.gateway.grants as grant_docs
		with data.gateway.grant_index as index
}

index_of(grant_docs) := {ins: {purp: [gid |
	some gid, doc in grant_docs
	doc.insurer == ins
	doc.purpose == purp
] |
	some inner in grant_docs
	inner.insurer == ins
	purp := inner.purpose
} |
	some outer in grant_docs
	ins := outer.insurer
}

# Deep-merges into the query: lists are replaced, objects merged key by key.
patched(resource_patch) := object.union(query, {"resource": resource_patch})

with_filters(filters) := json.patch(query, [{"op": "replace", "path": "/resource/filters", "value": filters}])

as_actor(role, action) := object.union(query, {"subject": {"role": role}, "action": action})

allowed(result) if {
	result.allow == true
	result.reasons == []
}

# Denied for exactly this reason among possibly others; a deny never names a grant or
# carries obligations.
denied_for(result, reason) if {
	result.allow == false
	reason in result.reasons
	result.grant_id == null
	result.obligations == null
}

only_reason(result, reason) if {
	denied_for(result, reason)
	count(result.reasons) == 1
}

# --- allow, with the obligations of the covering grant --------------------------------------

test_allows_a_query_the_grant_covers if {
	result := decide(query)
	allowed(result)
	result.grant_id == "g-1"

	# min_cell_size never below the floor (grant 3, floor 5); max_rows never above the cap.
	result.obligations == {
		"min_cell_size": 5, "max_rows": 10000, "mask_fields": [], "noise": null,
		"disclosure": {"difference_k": 5, "rounding": 1, "budget": null, "dataset_epsilon_cap": 20},
	}
}

test_obligations_take_the_stricter_grant if {
	strict := object.union(grant_g1, {"min_cell_size": 20, "max_rows": 500})
	result := decide_grants(query, {"g-1": strict})
	allowed(result)
	result.obligations.min_cell_size == 20
	result.obligations.max_rows == 500
}

test_disclosure_obligations_come_from_the_grant if {
	noisy := object.union(grant_g1, {
		"min_cell_size": 20, "difference_k": 30, "rounding": 5,
		"noise": {"mechanism": "laplace", "epsilon": 0.5, "bounds": {"psn_part_amt": [0, 20000]}},
		"budget": {"epsilon": 2, "period": "month"},
	})
	result := decide_grants(query, {"g-1": noisy})
	allowed(result)
	result.obligations.noise == noisy.noise
	result.obligations.disclosure == {
		"difference_k": 30, "rounding": 5, "budget": {"epsilon": 2, "period": "month"},
		"dataset_epsilon_cap": 20,
	}
}

test_difference_k_never_below_the_minimum_cell_size if {
	loose := object.union(grant_g1, {"min_cell_size": 20, "difference_k": 2, "rounding": 0})
	result := decide_grants(query, {"g-1": loose})
	allowed(result)
	result.obligations.disclosure.difference_k == 20
	result.obligations.disclosure.rounding == 1
	result.obligations.noise == null
}

test_obligations_fall_back_to_catalog_defaults if {
	silent := object.remove(grant_g1, ["min_cell_size", "max_rows"])
	result := decide_grants(query, {"g-1": silent})
	allowed(result)
	result.obligations.min_cell_size == 10
	result.obligations.max_rows == 10000
}

# --- dimensions, measures and fields ------------------------------------------------------

test_denies_an_ungranted_dimension if {
	allowed(decide(patched({"dimensions": ["gend", "year"]})))
	only_reason(decide(patched({"dimensions": ["gend", "hosp_lv"]})), "dimension hosp_lv is not granted")
}

test_denies_an_ungranted_measure_field if {
	allowed(decide(patched({"measures": [{"fn": "mean", "field": "hifp_pay"}]})))
	only_reason(
		decide(patched({"measures": [{"fn": "sum", "field": "psn_part_amt"}]})),
		"measure field psn_part_amt is not granted",
	)
}

# "最小必须": the purpose caps even a grant that lists the field.
test_denies_a_field_the_purpose_does_not_need_even_if_granted if {
	allowed(decide(patched({"measures": [{"fn": "sum", "field": "hifp_pay"}]})))
	only_reason(
		decide(patched({"measures": [{"fn": "sum", "field": "acct_pay"}]})),
		"field acct_pay is not necessary for purpose hmb_pricing",
	)
}

test_denies_a_listed_field_the_purpose_does_not_need if {
	fields := array.concat(query.resource.fields, ["acct_pay"])
	denied_for(decide(patched({"fields": fields})), "field acct_pay is not necessary for purpose hmb_pricing")
}

test_denies_a_field_that_is_not_a_measure_of_the_dataset if {
	result := decide(patched({"measures": [{"fn": "sum", "field": "gend"}]}))
	denied_for(result, "field gend is not a measure of dataset settlements")
	allowed(decide(query))
}

test_denies_a_dimension_the_dataset_does_not_have if {
	result := decide(patched({"dimensions": ["gend", "psn_id"]}))
	denied_for(result, "dimension psn_id is not a dimension of dataset settlements")
	allowed(decide(patched({"dimensions": ["gend"]})))
}

test_denies_a_listed_field_the_dataset_does_not_have if {
	fields := array.concat(query.resource.fields, ["psn_id"])
	result := decide(patched({"fields": fields}))
	denied_for(result, "field psn_id is not a field of dataset settlements")
	denied_for(result, "field psn_id is not granted")
	denied_for(result, "field psn_id is not necessary for purpose hmb_pricing")
}

# --- aggregate functions -------------------------------------------------------------------

test_denies_min_and_max if {
	only_reason(
		decide(patched({"measures": [{"fn": "min", "field": "medfee_sumamt"}]})),
		"aggregate function min is not allowed",
	)
	only_reason(
		decide(patched({"measures": [{"fn": "max", "field": "medfee_sumamt"}]})),
		"aggregate function max is not allowed",
	)
	allowed(decide(patched({"measures": [{"fn": "count"}, {"fn": "mean", "field": "medfee_sumamt"}]})))
}

test_denies_sum_and_mean_without_a_field if {
	only_reason(decide(patched({"measures": [{"fn": "sum"}]})), "aggregate function sum needs a measure field")
	only_reason(
		decide(patched({"measures": [{"fn": "mean", "field": null}]})),
		"aggregate function mean needs a measure field",
	)
	allowed(decide(patched({"measures": [{"fn": "count_persons", "field": null}]})))
}

# --- filters --------------------------------------------------------------------------------

test_allows_a_filter_on_a_granted_dimension if {
	allowed(decide(patched({"filters": {"insu_admdvs": ["420100"], "gend": ["1"]}})))
}

test_denies_a_filter_on_an_ungranted_dimension if {
	only_reason(
		decide(patched({"filters": {"insu_admdvs": ["420100"], "hosp_lv": ["3"]}})),
		"filter on hosp_lv is not granted",
	)
}

test_denies_a_filter_on_something_that_is_not_a_dimension if {
	result := decide(patched({"filters": {"insu_admdvs": ["420100"], "medfee_sumamt": ["0"]}}))
	denied_for(result, "filter on medfee_sumamt is not a dimension of dataset settlements")
}

test_a_grant_filter_binds_every_query if {
	allowed(decide(patched({"filters": {"insu_admdvs": ["420100", "420200"]}})))
	reason := "filter on insu_admdvs must stay within the granted values"
	only_reason(decide(with_filters({"insu_admdvs": ["420100", "430100"]})), reason)
	only_reason(decide(with_filters({"insu_admdvs": []})), reason)
	only_reason(decide(with_filters({"gend": ["1"]})), reason)
	only_reason(decide(with_filters({})), reason)
	only_reason(decide(json.remove(query, ["resource/filters"])), reason)
}

# Filtering on the restricted dimension is allowed even if the grant does not list it for
# grouping; grouping by it is not.
test_a_grant_filter_dimension_may_be_filtered_but_not_grouped if {
	narrow := object.union(grant_g1, {"dimensions": ["age_band", "gend", "year"]})
	allowed(decide_grants(query, {"g-1": narrow}))
	only_reason(
		decide_grants(patched({"dimensions": ["insu_admdvs"]}), {"g-1": narrow}),
		"dimension insu_admdvs is not granted",
	)
}

# --- datasets and purposes ----------------------------------------------------------------

test_denies_an_ungranted_dataset if {
	on_person_years := patched({"dataset": "person_years"})
	only_reason(decide(on_person_years), "dataset person_years is not granted")
	wider := object.union(grant_g1, {"datasets": ["settlements", "person_years"]})
	allowed(decide_grants(on_person_years, {"g-1": wider}))
}

test_denies_a_dataset_outside_the_catalog if {
	result := decide(patched({"dataset": "claims"}))
	denied_for(result, "dataset claims is not in the catalog")
	denied_for(result, "dataset claims is not granted")
}

test_denies_a_purpose_without_a_grant if {
	claims := object.union(with_filters({}), {
		"purpose": "claims_fast_track",
		"resource": {"dimensions": ["year"], "fields": ["year", "medfee_sumamt"]},
	})
	only_reason(decide(claims), "no grant for purpose claims_fast_track")
	claims_grant := object.union(object.remove(grant_g1, ["filters"]), {
		"purpose": "claims_fast_track",
		"dimensions": ["year"],
		"measures": ["medfee_sumamt"],
	})
	allowed(decide_grants(claims, {"g-7": claims_grant}))
}

test_denies_a_purpose_outside_the_catalog if {
	result := decide(object.union(query, {"purpose": "marketing"}))
	denied_for(result, "purpose marketing is not in the catalog")
	denied_for(result, "no grant for purpose marketing")
}

# --- grant lifetime -------------------------------------------------------------------------

test_denies_an_expired_grant if {
	only_reason(decide(object.union(query, {"time_ns": t0 + (2 * day_ns)})), "grant g-1 has expired")

	# valid_until_ns is exclusive, valid_from_ns inclusive.
	only_reason(decide(object.union(query, {"time_ns": grant_g1.valid_until_ns})), "grant g-1 has expired")
	allowed(decide(object.union(query, {"time_ns": grant_g1.valid_from_ns})))
}

test_denies_a_grant_not_yet_valid if {
	only_reason(decide(object.union(query, {"time_ns": t0 - (2 * day_ns)})), "grant g-1 is not yet valid")
}

test_denies_a_revoked_grant if {
	revoked := object.union(grant_g1, {"revoked": true})
	only_reason(decide_grants(query, {"g-1": revoked}), "grant g-1 was revoked")
}

test_denies_a_malformed_grant if {
	# A time of another type would compare as always valid: the grant must be unusable.
	stringly := object.union(grant_g1, {"valid_until_ns": "2099-01-01"})
	only_reason(decide_grants(query, {"g-1": stringly}), "grant g-1 is malformed")
	no_revoked := object.remove(grant_g1, ["revoked"])
	only_reason(decide_grants(query, {"g-1": no_revoked}), "grant g-1 is malformed")
}

test_an_expired_grant_does_not_block_a_live_one if {
	old := object.union(grant_g1, {"grant_id": "g-0", "valid_until_ns": t0 - day_ns, "valid_from_ns": t0 - (9 * day_ns)})
	result := decide_grants(query, {"g-0": old, "g-1": grant_g1})
	allowed(result)
	result.grant_id == "g-1"
}

# --- whose grant ----------------------------------------------------------------------------

test_never_uses_another_insurers_grant if {
	# g-9 (ins-002) has hosp_lv; ins-001's own g-1 does not.
	with_hosp_lv := patched({"dimensions": ["hosp_lv"]})
	only_reason(decide(with_hosp_lv), "dimension hosp_lv is not granted")
	stranger := object.union(query, {"subject": {"org": "ins-003"}})
	only_reason(decide(stranger), "no grant for purpose hmb_pricing")
	other := object.union(with_hosp_lv, {"subject": {"org": "ins-002"}})
	result := decide(other)
	allowed(result)
	result.grant_id == "g-9"
}

test_any_one_covering_grant_allows_and_the_smallest_id_wins if {
	wide := object.union(grant_g1, {"grant_id": "g-2", "dimensions": ["age_band", "gend", "insu_admdvs", "year", "hosp_lv"], "min_cell_size": 30})
	both := {"g-1": grant_g1, "g-2": wide}
	narrow_query := decide_grants(query, both)
	allowed(narrow_query)
	narrow_query.grant_id == "g-1"
	wide_query := decide_grants(patched({"dimensions": ["hosp_lv"]}), both)
	allowed(wide_query)
	wide_query.grant_id == "g-2"
	wide_query.obligations.min_cell_size == 30
}

test_reasons_from_every_grant_when_none_covers if {
	other_gap := object.union(grant_g1, {"grant_id": "g-2", "dimensions": ["age_band", "gend", "insu_admdvs", "year", "hosp_lv"], "measures": ["hifp_pay"]})
	result := decide_grants(patched({"dimensions": ["hosp_lv"]}), {"g-1": grant_g1, "g-2": other_gap})
	result.reasons == ["dimension hosp_lv is not granted", "measure field medfee_sumamt is not granted"]
	denied_for(result, "dimension hosp_lv is not granted")
}

# --- the grant index (the engine adapter's path) ----------------------------------------------

test_the_grant_index_gives_the_same_decisions if {
	index := index_of(fixture_grants)
	index == {"ins-001": {"hmb_pricing": ["g-1"]}, "ins-002": {"hmb_pricing": ["g-9"]}}
	allowed(decide_indexed(query, fixture_grants, index))
	only_reason(
		decide_indexed(patched({"dimensions": ["hosp_lv"]}), fixture_grants, index),
		"dimension hosp_lv is not granted",
	)
	only_reason(
		decide_indexed(object.union(query, {"subject": {"org": "ins-003"}}), fixture_grants, index),
		"no grant for purpose hmb_pricing",
	)
}

# The index only narrows the search: a stale entry naming another insurer's grant is ignored.
test_a_stale_grant_index_cannot_hand_over_a_grant if {
	stale := {"ins-001": {"hmb_pricing": ["g-9"]}}
	only_reason(decide_indexed(query, fixture_grants, stale), "no grant for purpose hmb_pricing")
	only_reason(decide_indexed(query, fixture_grants, {}), "no grant for purpose hmb_pricing")
	allowed(decide_indexed(query, fixture_grants, {"ins-001": {"hmb_pricing": ["g-1"]}}))
}

# --- roles and actions --------------------------------------------------------------------

test_only_insurers_query if {
	only_reason(decide(as_actor("admin", "query.aggregate")), "action query.aggregate is not allowed for role admin")
	only_reason(decide(as_actor("auditor", "query.aggregate")), "action query.aggregate is not allowed for role auditor")
	only_reason(decide(as_actor("subject", "query.aggregate")), "action query.aggregate is not allowed for role subject")
	allowed(decide(as_actor("insurer", "query.aggregate")))
}

test_catalog_read_is_for_insurers if {
	result := decide(as_actor("insurer", "catalog.read"))
	allowed(result)
	result.grant_id == null
	result.obligations == {"min_cell_size": 10, "max_rows": 10000, "mask_fields": [], "noise": null}
	only_reason(decide(as_actor("auditor", "catalog.read")), "action catalog.read is not allowed for role auditor")
}

test_grants_manage_is_for_admins if {
	allowed(decide(as_actor("admin", "grants.manage")))
	only_reason(decide(as_actor("insurer", "grants.manage")), "action grants.manage is not allowed for role insurer")
}

test_consents_manage_is_for_admins if {
	allowed(decide(as_actor("admin", "consents.manage")))
	only_reason(decide(as_actor("insurer", "consents.manage")), "action consents.manage is not allowed for role insurer")
	only_reason(decide(as_actor("subject", "consents.manage")), "action consents.manage is not allowed for role subject")
}

test_persons_enrollment_is_for_insurers if {
	result := decide(enrollment_check)
	allowed(result)
	result.grant_id == null
	result.obligations.mask_fields == []
	only_reason(decide(object.union(enrollment_check, {"subject": {"role": "admin"}})), "action persons.enrollment is not allowed for role admin")
	only_reason(decide(object.union(enrollment_check, {"subject": {"role": "auditor"}})), "action persons.enrollment is not allowed for role auditor")
}

# --- person actions: verified consent claims in the input ---------------------------------------

enrollment_consent := {
	"consent_id": "cst-1",
	"sub": "pairwise-sub-of-ins-001",
	"client_id": "ins-001",
	"jti": "jti-1",
	"exp": 1763800600,
	"single_use": true,
	"authorization_details": [{
		"type": "yibao_data_access",
		"actions": ["read"],
		"datatypes": ["enrollment.admdvs", "enrollment.insutype", "enrollment.status"],
		"purpose": "enrollment_check",
		"period": {"start": "2025-01-01", "end": "2025-12-31"},
	}],
}

enrollment_check := {
	"subject": {"client_id": "c-1", "role": "insurer", "org": "ins-001"},
	"action": "persons.enrollment",
	"purpose": "enrollment_check",
	"resource": {"dataset": "persons", "datatypes": ["enrollment.admdvs", "enrollment.insutype", "enrollment.status"]},
	"consent": enrollment_consent,
	"time_ns": t0,
}

all_settlement_fields := [
	"setl_date", "med_type", "hosp_lv", "fixmedins_code", "dise_codg", "dise_category",
	"medfee_sumamt", "inscp_scp_amt", "fulamt_ownpay_amt", "overlmt_selfpay", "hifp_pay",
	"hifmi_pay", "maf_pay", "acct_pay", "psn_cash_pay", "psn_part_amt",
]

claims_consent := object.union(enrollment_consent, {
	"single_use": false,
	"authorization_details": [{
		"type": "yibao_data_access",
		"actions": ["read"],
		"datatypes": ["settlements.amounts", "settlements.diagnosis_category", "settlements.summary"],
		"purpose": "claims_fast_track",
		"period": {"start": "2025-01-01", "end": "2025-12-31"},
	}],
})

settlements_read := {
	"subject": {"client_id": "c-1", "role": "insurer", "org": "ins-001"},
	"action": "persons.settlements",
	"purpose": "claims_fast_track",
	"resource": {
		"dataset": "person_settlements",
		"fields": all_settlement_fields,
		"datatypes": ["settlements.amounts", "settlements.diagnosis_category", "settlements.summary"],
	},
	"consent": claims_consent,
	"time_ns": t0,
}

with_datatypes(types) := object.union(settlements_read, {"resource": {"datatypes": types}})

test_settlements_release_only_what_the_purpose_needs if {
	result := decide(settlements_read)
	allowed(result)
	result.grant_id == null

	# The diagnosis only as its ICD-10 category; no institution, no personal-account payments.
	result.obligations.mask_fields == ["acct_pay", "dise_codg", "fixmedins_code", "psn_cash_pay"]
}

test_settlements_withhold_datatypes_not_requested if {
	result := decide(with_datatypes(["settlements.summary"]))
	allowed(result)
	"medfee_sumamt" in result.obligations.mask_fields
	"dise_category" in result.obligations.mask_fields
	not "setl_date" in result.obligations.mask_fields
}

# A purpose that needs the full code would list dise_codg for a datatype: the same rules then
# release it.
test_the_full_diagnosis_code_needs_a_purpose_that_needs_it if {
	wider := {"claims_fast_track": {"settlements.diagnosis_category": {"dise_category", "dise_codg"}}}
	result := authz.decision with input as with_datatypes(["settlements.diagnosis_category"])
		with data.gateway.catalog as catalog
		with data.gateway.grants as fixture_grants
		with authz.person_release as wider
	allowed(result)
	not "dise_codg" in result.obligations.mask_fields
}

test_person_actions_need_a_consent_of_the_caller if {
	only_reason(decide(object.remove(settlements_read, ["consent"])), "request has no verified consent")
	only_reason(decide(object.remove(enrollment_check, ["consent"])), "request has no verified consent")
	only_reason(
		decide(object.union(settlements_read, {"consent": {"client_id": "ins-002"}})),
		"consent was issued to another insurer",
	)
	only_reason(
		decide(object.union(settlements_read, {"subject": {"org": null}})),
		"consent was issued to another insurer",
	)
}

test_person_actions_need_their_own_purpose if {
	denied_for(
		decide(object.union(settlements_read, {"purpose": "enrollment_check"})),
		"purpose enrollment_check does not serve persons.settlements",
	)
	only_reason(
		decide(object.union(settlements_read, {"consent": enrollment_consent})),
		"consent does not cover purpose claims_fast_track",
	)
}

test_person_actions_read_only_consented_datatypes if {
	narrow := object.union(claims_consent, {"authorization_details": [object.union(
		claims_consent.authorization_details[0],
		{"datatypes": ["settlements.summary"]},
	)]})
	result := decide(object.union(settlements_read, {"consent": narrow}))
	result.reasons == [
		"datatype settlements.amounts is not consented",
		"datatype settlements.diagnosis_category is not consented",
	]
	only_reason(decide(with_datatypes([])), "request names no datatype")
	allowed(decide(object.union(with_datatypes(["settlements.summary"]), {"consent": narrow})))
}

test_persons_settlements_is_for_insurers if {
	only_reason(
		decide(object.union(settlements_read, {"subject": {"role": "subject"}})),
		"action persons.settlements is not allowed for role subject",
	)
}

test_subjects_manage_their_own_consents_and_read_their_access if {
	allowed(decide(as_actor("subject", "consents.own")))
	allowed(decide(as_actor("subject", "subjects.access")))
	only_reason(decide(as_actor("insurer", "consents.own")), "action consents.own is not allowed for role insurer")
	only_reason(decide(as_actor("admin", "subjects.access")), "action subjects.access is not allowed for role admin")
}

test_audit_read_is_for_auditors if {
	allowed(decide(as_actor("auditor", "audit.read")))
	only_reason(decide(as_actor("admin", "audit.read")), "action audit.read is not allowed for role admin")
	only_reason(decide(as_actor("subject", "audit.read")), "action audit.read is not allowed for role subject")
}

test_denies_an_unknown_action if {
	only_reason(decide(as_actor("insurer", "data.export")), "action data.export is not allowed for role insurer")
	allowed(decide(as_actor("insurer", "catalog.read")))
}

# --- default deny: missing or malformed anything ----------------------------------------------

test_denies_an_empty_request if {
	result := decide({})
	result.reasons == ["request has no action", "request has no subject role"]
	denied_for(result, "request has no action")
}

test_denies_without_policy_data if {
	result := authz.decision with input as query
		with data.gateway.catalog as {}
		with data.gateway.grants as {}
	denied_for(result, "policy data has no valid catalog defaults")
	denied_for(result, "no grant for purpose hmb_pricing")
	catalog_read := authz.decision with input as as_actor("insurer", "catalog.read")
		with data.gateway.catalog as object.remove(catalog, ["defaults"])
		with data.gateway.grants as fixture_grants
	only_reason(catalog_read, "policy data has no valid catalog defaults")
	allowed(decide(as_actor("insurer", "catalog.read")))
}

test_denies_a_request_without_org_purpose_or_time if {
	only_reason(decide(json.remove(query, ["subject/org"])), "request has no subject org")
	only_reason(decide(json.remove(query, ["purpose"])), "request has no purpose")
	only_reason(decide(json.remove(query, ["time_ns"])), "request has no time")
	only_reason(decide(object.union(query, {"time_ns": "now"})), "request has no time")
	allowed(decide(query))
}

test_denies_a_request_without_resource_or_dataset if {
	result := decide(json.remove(query, ["resource"]))
	denied_for(result, "request has no resource")
	only_reason(decide(json.remove(query, ["resource/dataset"])), "resource has no dataset")
}

# A container of the wrong type is refused, never read as empty.
test_denies_malformed_resource_members if {
	only_reason(decide(patched({"dimensions": "hosp_lv"})), "resource.dimensions must be a list of strings")
	only_reason(decide(patched({"measures": "sum"})), "resource.measures must be a list of {fn, field?} objects")
	only_reason(decide(patched({"measures": ["sum"]})), "resource.measures must be a list of {fn, field?} objects")
	only_reason(decide(patched({"filters": ["insu_admdvs"]})), "resource.filters must map dimensions to lists of strings")
	only_reason(decide(patched({"filters": {"insu_admdvs": "420100"}})), "resource.filters must map dimensions to lists of strings")
	only_reason(decide(patched({"fields": "gend"})), "resource.fields must be a list of strings")
	allowed(decide(json.remove(query, ["resource/fields"])))
}

test_reasons_are_sorted_and_unique if {
	result := decide(patched({
		"dimensions": ["hosp_lv", "med_type", "hosp_lv"],
		"measures": [{"fn": "min", "field": "acct_pay"}],
	}))
	result.reasons == sort({r | some r in result.reasons})
	count(result.reasons) == count({r | some r in result.reasons})
	denied_for(result, "dimension med_type is not granted")
}

# A grant without its lists covers nothing. (Under `not`, OPA treats `d in undefined` as
# undefined, not false: the policy reads the lists with defaults so both engines deny.)
test_a_grant_without_dimensions_or_measures_covers_nothing if {
	no_dimensions := object.remove(grant_g1, ["dimensions"])
	result := decide_grants(query, {"g-1": no_dimensions})
	denied_for(result, "dimension gend is not granted")
	no_measures := object.remove(grant_g1, ["measures"])
	only_reason(decide_grants(query, {"g-1": no_measures}), "measure field medfee_sumamt is not granted")
}
