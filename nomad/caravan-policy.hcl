# Least-privilege ACL policy for the token Caravan's control plane uses (NOMAD_TOKEN).
#   nomad acl policy apply -description "Caravan control plane" caravan nomad/caravan-policy.hcl
#   nomad acl token create -name caravan -policy caravan -type client
#
# Caravan only changes the namespaces of its customers (caravan-<customer id>):
#   submit-job   plan, register and stop agent jobs (Nomad checks it for plan and deregister too)
#   read-job     read jobs, evaluations, allocations and deployments, and the client's allocation statistics
#   list-jobs    list them (the Nomad UI and `caravan job plan` read lists)
#   variables    write, read and destroy each agent job's secrets at nomad/jobs/caravan-<agent id>
# No node, agent or operator rights are needed, and none are granted.
#
# Creating a customer's namespace needs a management token in Nomad: give Caravan one only for that
# (CARAVAN_NOMAD_NAMESPACE_TOKEN), or create namespaces yourself from nomad/customer-namespace.hcl.

namespace "caravan-*" {
  capabilities = ["submit-job", "read-job", "list-jobs"]

  variables {
    path "nomad/jobs/caravan-*" {
      capabilities = ["write", "read", "destroy"]
    }
  }
}

# Caravan follows its agents on one event stream of every namespace (/v1/event/stream?namespace=*, topics Job,
# Allocation, Evaluation, Deployment), as customers' namespaces come and go. Nomad (1.10, and 1.9 since the fix of
# hashicorp/nomad#25089) lets a stream of all namespaces only to a management token or to a policy written for
# namespace "*" itself: without this rule the stream is refused (403) and agents' statuses stay stale. It lets the
# token read every job of the cluster, other namespaces' too (not their Variables): Caravan keeps nothing of
# a namespace not caravan-* and changes nothing outside them.
namespace "*" {
  capabilities = ["read-job"]
}
