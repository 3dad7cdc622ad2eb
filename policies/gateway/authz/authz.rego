# METADATA
# title: Gateway authorization
# description: >-
#   One decision for every request to the 医保商保 data-sharing gateway. Default deny: a
#   request is allowed only when no deny reason holds and, for aggregate queries, one live
#   grant of the caller covers the whole query. "Least necessary" (最小必须) is enforced twice:
#   the grant limits what an insurer may ask, and the purpose's necessary fields cap every
#   grant. Anything missing or mistyped in the input or the data is a deny reason, never an
#   error, so the decision document is always defined.
#
#   Written for speed, since every request waits for a decision: the allow path evaluates
#   few rules and no per-grant function calls, bodies bind data subtrees to locals, and the
#   wording of what needs more work (why a grant is unusable, what is malformed) is only
#   worked out once the cheap checks have failed.
#
#   Schemas (policies/schemas, `opa check --schema policies/schemas`): the input, and each
#   data subtree the gateway pushes. Not the data root: data.gateway.authz is this package.
# schemas:
#   - input: schema.input
#   - data.gateway.catalog: schema.gateway.catalog
#   - data.gateway.grants: schema.gateway.grants
#   - data.gateway.grant_index: schema.gateway.grant_index
package gateway.authz

# Aggregate functions the gateway computes. min and max are never allowed: each one is a
# single person's value.
aggregate_functions := {"count_persons", "count", "sum", "mean"}

# Functions that aggregate a measure field; the two counts take none.
field_functions := {"sum", "mean"}

# What each role may do at all. query.aggregate also needs a grant that covers the query.
# The person actions also need a verified, live consent token and DPoP proof, checked by the
# gateway before it asks, whose claims arrive as input.consent (person_reasons below).
# A signed-in person (subject) manages their own consents and reads their own access list.
role_actions := {
	"insurer": {"catalog.read", "query.aggregate", "persons.enrollment", "persons.settlements"},
	"admin": {"grants.manage", "consents.manage"},
	"auditor": {"audit.read"},
	"subject": {"consents.own", "subjects.access"},
}

# The purpose each person action serves: a consent for another purpose never reaches it.
person_action_purposes := {
	"persons.enrollment": "enrollment_check",
	"persons.settlements": "claims_fast_track",
}

# "最小必须" at the person level: for each purpose, what each consented datatype releases of
# the person's settlements. Everything else the gateway could answer is withheld by the
# obligations (mask_fields): e.g. claims_fast_track gets the diagnosis only as its ICD-10
# category (dise_category), never the full code (dise_codg), nor the institution or the
# personal-account payments.
person_release := {"claims_fast_track": {
	"settlements.summary": {"setl_date", "med_type", "hosp_lv"},
	"settlements.amounts": {
		"medfee_sumamt", "inscp_scp_amt", "fulamt_ownpay_amt", "overlmt_selfpay",
		"hifp_pay", "hifmi_pay", "maf_pay", "psn_part_amt",
	},
	"settlements.diagnosis_category": {"dise_category"},
}}

# METADATA
# title: Decision
# description: >-
#   The one entrypoint. Always defined: {allow, reasons (sorted, empty iff allow), grant_id
#   (the covering grant of an allowed query, else null), obligations (null when denied)}.
# entrypoint: true
decision := {
	"allow": true,
	"reasons": [],
	"grant_id": allowance.grant_id,
	"obligations": allowance.obligations,
} if {
	count(deny_reasons) == 0
	allowance
} else := {
	"allow": false,
	"reasons": sort(explained_reasons),
	"grant_id": null,
	"obligations": null,
}

# A deny that no rule explains still says why.
explained_reasons := deny_reasons if {
	count(deny_reasons) > 0
} else := {"denied by default"}

# Query checks run only when the role may query at all, so an admin calling the query
# endpoint hears about its role, not about grants it could never hold; and only on a query
# of the documented shape, since a container of the wrong type would be read as empty (or
# fail) and skip checks. A malformed query is told only what is malformed.
deny_reasons := base_reasons | query_reasons if {
	input.action == "query.aggregate"
	role_may_act
	well_shaped_query
}

deny_reasons := base_reasons | shape_reasons if {
	input.action == "query.aggregate"
	role_may_act
	not well_shaped_query
}

deny_reasons := base_reasons | person_reasons if {
	person_action
	role_may_act
}

deny_reasons := base_reasons if {
	input.action != "query.aggregate"
	not person_action
}

deny_reasons := base_reasons if not role_may_act

role_may_act if input.action in role_actions[input.subject.role]

person_action if is_string(person_action_purposes[input.action])

# What an allowed request carries: the covering grant (queries only) and the obligations.
# A grant may tighten the catalog defaults, never go below the floor or above the row cap.
allowance := {
	"grant_id": gid,
	"obligations": {
		"min_cell_size": min_cell,
		"max_rows": min([object.get(g, "max_rows", defaults.max_rows), defaults.max_rows]),
		"mask_fields": [],
		"noise": object.get(g, "noise", null),
		"disclosure": {
			"difference_k": max([object.get(g, "difference_k", min_cell), min_cell]),
			"rounding": max([object.get(g, "rounding", 1), 1]),
			"budget": object.get(g, "budget", null),
			"dataset_epsilon_cap": dataset_epsilon_cap,
		},
	},
} if {
	input.action == "query.aggregate"
	defaults := catalog_defaults
	gid := chosen_grant_id
	g := usable_grants[gid]
	min_cell := max([object.get(g, "min_cell_size", defaults.min_cell_size), defaults.min_cell_size_floor])
}

# Cross-request disclosure control (docs/disclosure.md). A cell within difference_k − 1
# persons of an earlier release is suppressed; the grant may raise k above its minimum cell
# size, never lower it. Noise (the grant's mechanism, ε per query and published per
# person-year bounds) spends the grant's budget per period and, across every grant, at most
# this much ε per data version and dataset.
dataset_epsilon_cap := 20

allowance := {
	"grant_id": null,
	"obligations": {
		"min_cell_size": max([defaults.min_cell_size, defaults.min_cell_size_floor]),
		"max_rows": defaults.max_rows,
		"mask_fields": withheld_fields,
		"noise": null,
	},
} if {
	input.action != "query.aggregate"
	defaults := catalog_defaults
}

# Fields of a person-level answer to withhold: every field the gateway could answer that no
# consented, requested datatype releases for the purpose. Empty for every other action.
withheld_fields := sort([f | some f in query_fields; not f in released_fields]) if {
	input.action == "persons.settlements"
} else := []

catalog_defaults := defaults if {
	defaults := data.gateway.catalog.defaults
	is_number(defaults.min_cell_size)
	is_number(defaults.min_cell_size_floor)
	is_number(defaults.max_rows)
}

# --- reasons for every action --------------------------------------------------------------

# Under `not`, a call or `in` must never get an undefined argument: OPA hoists the argument
# out of the negation, so an undefined one makes the whole rule undefined (regorus does not).
# Members that may be missing are read with object.get and a default, or through a helper
# rule whose negation is safe in both engines.
base_reasons contains "request has no subject role" if not is_string(object.get(input, ["subject", "role"], null))

base_reasons contains "request has no action" if not is_string(object.get(input, "action", null))

base_reasons contains sprintf("action %s is not allowed for role %s", [input.action, input.subject.role]) if {
	not role_may_act
	is_string(input.subject.role)
	is_string(input.action)
}

base_reasons contains "policy data has no valid catalog defaults" if not catalog_defaults

# --- the query, read as sets ---------------------------------------------------------------

# A member that is missing, or of the wrong type, reads as empty here so that no rule fails
# on it (regorus evaluates eagerly under `with`); well_shaped_query denies the wrong type.
requested_dimensions := {d | is_array(input.resource.dimensions); some d in input.resource.dimensions}

query_measures := [m | is_array(input.resource.measures); some m in input.resource.measures]

query_filters := {k: v | is_object(input.resource.filters); some k, v in input.resource.filters}

query_fields := {f | is_array(input.resource.fields); some f in input.resource.fields}

measure_fields := {m.field | some m in query_measures; m.field != null}

filter_keys := {k | some k, _ in query_filters}

# Every field the query touches: grouped on, aggregated, filtered on, or listed by the caller.
requested_fields := ((requested_dimensions | measure_fields) | filter_keys) | query_fields

# --- reasons for query.aggregate: the shape of the request -------------------------------------

# One cheap test on the allow path; what exactly is wrong is only worked out when it fails.
well_shaped_query if {
	[
		type_name(object.get(input, ["subject", "org"], null)),
		type_name(object.get(input, "purpose", null)),
		type_name(object.get(input, "time_ns", null)),
		type_name(object.get(input, ["resource", "dataset"], null)),
		type_name(object.get(input, ["resource", "dimensions"], [])),
		type_name(object.get(input, ["resource", "measures"], [])),
		type_name(object.get(input, ["resource", "filters"], {})),
		type_name(object.get(input, ["resource", "fields"], [])),
	] == ["string", "string", "number", "string", "array", "array", "object", "array"]
	every item in object.get(input, ["resource", "measures"], []) {
		is_string(item.fn)
	}
	every values in object.get(input, ["resource", "filters"], {}) {
		is_array(values)
	}
}

shape_reasons contains "request has no subject org" if not is_string(object.get(input, ["subject", "org"], null))

shape_reasons contains "request has no purpose" if not is_string(object.get(input, "purpose", null))

shape_reasons contains "request has no time" if not is_number(object.get(input, "time_ns", null))

shape_reasons contains "request has no resource" if not is_object(object.get(input, "resource", null))

shape_reasons contains "resource has no dataset" if {
	is_object(input.resource)
	not is_string(object.get(input.resource, "dataset", null))
}

shape_reasons contains "resource.dimensions must be a list of strings" if {
	not is_array(object.get(input, ["resource", "dimensions"], []))
}

shape_reasons contains "resource.measures must be a list of {fn, field?} objects" if {
	not is_array(object.get(input, ["resource", "measures"], []))
}

shape_reasons contains "resource.measures must be a list of {fn, field?} objects" if {
	measures := object.get(input, ["resource", "measures"], [])
	is_array(measures)
	some item in measures
	not names_a_function(item)
}

names_a_function(item) if is_string(item.fn)

shape_reasons contains "resource.filters must map dimensions to lists of strings" if {
	not is_object(object.get(input, ["resource", "filters"], {}))
}

shape_reasons contains "resource.filters must map dimensions to lists of strings" if {
	filters := object.get(input, ["resource", "filters"], {})
	is_object(filters)
	some values in filters
	not is_array(values)
}

shape_reasons contains "resource.fields must be a list of strings" if {
	not is_array(object.get(input, ["resource", "fields"], []))
}

# --- reasons for query.aggregate: functions, the catalog and the purpose ------------------------

query_reasons contains sprintf("aggregate function %v is not allowed", [item.fn]) if {
	some item in query_measures
	not item.fn in aggregate_functions
}

query_reasons contains sprintf("aggregate function %v needs a measure field", [item.fn]) if {
	some item in query_measures
	item.fn in field_functions
	not is_string(object.get(item, "field", null))
}

query_reasons contains sprintf("dataset %v is not in the catalog", [input.resource.dataset]) if {
	not dataset_in_catalog
}

dataset_in_catalog if is_object(data.gateway.catalog.datasets[input.resource.dataset])

# Fields of the dataset the query names, checked against the catalog in one pass.
query_reasons contains msg if {
	dataset := data.gateway.catalog.datasets[input.resource.dataset]
	is_object(dataset)
	ds := {
		"dimensions": object.get(dataset, "dimensions", []),
		"measures": object.get(dataset, "measures", []),
	}
	name := input.resource.dataset
	some msg in ((({sprintf("dimension %v is not a dimension of dataset %s", [d, name]) |
		some d in requested_dimensions
		not d in ds.dimensions
	} | {sprintf("filter on %v is not a dimension of dataset %s", [k, name]) |
		some k in filter_keys
		not k in ds.dimensions
	}) | {sprintf("field %v is not a measure of dataset %s", [f, name]) |
		some f in measure_fields
		not f in ds.measures
	}) | {sprintf("field %v is not a field of dataset %s", [f, name]) |
		# Only listed fields that no dimension, measure or filter above already explains.
		some f in query_fields
		not f in ds.dimensions
		not f in ds.measures
		not f in requested_dimensions
		not f in measure_fields
		not f in filter_keys
	})
}

query_reasons contains sprintf("purpose %v is not in the catalog", [input.purpose]) if {
	not purpose_in_catalog
}

purpose_in_catalog if is_object(data.gateway.catalog.purposes[input.purpose])

# "最小必须": the purpose caps every grant, even one that somehow lists more.
query_reasons contains sprintf("field %v is not necessary for purpose %s", [f, input.purpose]) if {
	# Guarded by a rule: the regorus VM (compiled mode) does not stop at an undefined
	# `purpose := ...[input.purpose]` as OPA and the regorus interpreter do.
	purpose_in_catalog
	necessary := object.get(data.gateway.catalog.purposes[input.purpose], "necessary_fields", [])
	some f in requested_fields
	not f in necessary
}

# --- reasons for query.aggregate: the grants ---------------------------------------------------

# The caller's own grants for the requested purpose. Another insurer's grant is never a
# candidate: it can only show up as "no grant". grant_index ({insurer: {purpose: [grant
# ids]}}, derived from grants by the engine adapter) saves walking every grant of every
# insurer on each decision; it only narrows the search, each grant is still checked here.
candidate_grants := {gid: g |
	# Two dynamic keys in one reference are slow in regorus; one at a time is not.
	by_purpose := data.gateway.grant_index[input.subject.org]
	ids := by_purpose[input.purpose]
	is_array(ids)
	some gid in ids
	g := data.gateway.grants[gid]
	g.insurer == input.subject.org
	g.purpose == input.purpose
} if {
	is_object(data.gateway.grant_index)
} else := {gid: g |
	is_object(data.gateway.grants)
	some gid, g in data.gateway.grants
	g.insurer == input.subject.org
	g.purpose == input.purpose
}

# Live candidates that cover the dataset. Times of another type would compare as always
# valid, so they must be numbers; anything else odd makes the grant unusable.
usable_grants := {gid: g |
	some gid, g in candidate_grants
	g.revoked == false
	is_number(g.valid_from_ns)
	is_number(g.valid_until_ns)
	g.valid_from_ns <= input.time_ns
	input.time_ns < g.valid_until_ns
	input.resource.dataset in g.datasets
	is_object(object.get(g, "filters", {}))
	is_number(object.get(g, "min_cell_size", 1))
	is_number(object.get(g, "max_rows", 1))
}

# What each usable grant leaves uncovered; a grant with no gaps covers the query.
grant_gaps := {gid: gaps(g) | some gid, g in usable_grants}

# Several grants may cover a query; the smallest id wins so the choice is stable.
chosen_grant_id := min({gid | some gid, missing in grant_gaps; count(missing) == 0})

gaps(grant) := result if {
	g := {
		"dimensions": object.get(grant, "dimensions", []),
		"measures": object.get(grant, "measures", []),
		"filters": object.get(grant, "filters", {}),
	}
	result := ((({sprintf("dimension %v is not granted", [d]) |
		some d in requested_dimensions
		not d in g.dimensions
	} | {sprintf("measure field %v is not granted", [f]) |
		some f in measure_fields
		not f in g.measures
	}) | {sprintf("field %v is not granted", [f]) |
		# Only listed fields that no dimension, measure or filter here already explains.
		some f in query_fields
		not f in g.dimensions
		not f in g.measures
		not f in requested_dimensions
		not f in measure_fields
		not f in filter_keys
	}) | {sprintf("filter on %v is not granted", [k]) |
		# Filtering on a dimension the grant itself restricts is fine even when the grant
		# does not list it for grouping.
		some k in filter_keys
		not k in g.dimensions
		not g.filters[k]
	}) | {sprintf("filter on %s must stay within the granted values", [k]) |
		# A grant filter such as insu_admdvs: ["420100"] binds every query: the query must
		# filter that dimension to a non-empty subset of the granted values.
		some k, allowed in g.filters
		not within(object.get(query_filters, k, []), allowed)
	}
}

within(values, allowed) if {
	is_array(values)
	count(values) > 0
	every v in values {
		v in allowed
	}
}

query_reasons contains sprintf("no grant for purpose %v", [input.purpose]) if {
	count(candidate_grants) == 0
	is_string(input.subject.org)
}

# Why each candidate is unusable, worked out only when no grant is usable at all.
query_reasons contains msg if {
	count(usable_grants) == 0
	some gid, g in candidate_grants
	msg := unusable_reason(gid, g)
}

unusable_reason(gid, g) := sprintf("grant %s was revoked", [gid]) if {
	g.revoked == true
} else := sprintf("grant %s is malformed", [gid]) if {
	not well_formed_grant(g)
} else := sprintf("grant %s is not yet valid", [gid]) if {
	input.time_ns < g.valid_from_ns
} else := sprintf("grant %s has expired", [gid]) if {
	input.time_ns >= g.valid_until_ns
} else := sprintf("dataset %v is not granted", [input.resource.dataset]) if {
	is_number(input.time_ns)
	not input.resource.dataset in g.datasets
}

well_formed_grant(g) if {
	is_boolean(g.revoked)
	is_number(g.valid_from_ns)
	is_number(g.valid_until_ns)
	is_array(g.datasets)
	is_object(object.get(g, "filters", {}))
	is_number(object.get(g, "min_cell_size", 1))
	is_number(object.get(g, "max_rows", 1))
}

query_reasons contains gap if {
	not chosen_grant_id
	some missing in grant_gaps
	some gap in missing
}

# --- person actions: the verified consent claims ------------------------------------------------

# The consent's authorization_details entries for the request's purpose ({} when absent or of
# another shape: then person_reasons explain).
consent_details := [d |
	is_array(input.consent.authorization_details)
	some d in input.consent.authorization_details
	is_object(d)
	d.purpose == input.purpose
]

consented_datatypes := {t |
	some d in consent_details
	is_array(d.datatypes)
	some t in d.datatypes
}

requested_datatypes := {t | is_array(input.resource.datatypes); some t in input.resource.datatypes}

released_fields := {f |
	some t in requested_datatypes
	t in consented_datatypes
	some f in object.get(person_release, [input.purpose, t], set())
}

person_reasons contains "request has no verified consent" if not is_object(object.get(input, "consent", null))

person_reasons contains "consent was issued to another insurer" if {
	is_object(input.consent)
	not consent_of_caller
}

consent_of_caller if {
	is_string(input.subject.org)
	input.consent.client_id == input.subject.org
}

person_reasons contains "request has no purpose" if not is_string(object.get(input, "purpose", null))

person_reasons contains sprintf("purpose %v does not serve %s", [input.purpose, input.action]) if {
	is_string(input.purpose)
	not purpose_fits_action
}

purpose_fits_action if person_action_purposes[input.action] == input.purpose

person_reasons contains sprintf("consent does not cover purpose %v", [input.purpose]) if {
	is_string(input.purpose)
	is_object(input.consent)
	count(consent_details) == 0
}

person_reasons contains "request names no datatype" if count(requested_datatypes) == 0

person_reasons contains sprintf("datatype %v is not consented", [t]) if {
	count(consent_details) > 0
	some t in requested_datatypes
	not t in consented_datatypes
}
