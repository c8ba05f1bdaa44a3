# The namespace of one Caravan customer. Caravan creates it on demand (with a management token in
# CARAVAN_NOMAD_NAMESPACE_TOKEN); to create it yourself instead, replace the customer id and run
#   nomad namespace apply nomad/customer-namespace.hcl
# Everything of the customer's agents lives in it: jobs, allocations, evaluations and Variables.

name        = "caravan-cu-0123456789ab"
description = "Caravan customer cu-0123456789ab: its agents' jobs, allocations and variables"

meta {
  caravan_owner    = "caravan"
  caravan_customer = "cu-0123456789ab"
}
