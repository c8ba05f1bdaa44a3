# Nomad agent config for trying Caravan against a dev agent:
#   nomad agent -dev -config nomad/agent-dev.hcl
# Agents run with the raw_exec driver from Caravan's virtualenv (CARAVAN_AGENT_PYTHON).

client {
  enabled = true
}

plugin "raw_exec" {
  config {
    enabled = true
  }
}
