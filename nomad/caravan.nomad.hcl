# Caravan itself on Nomad: the gateway and control plane (`caravan serve`). Agents are submitted by it
# as their own jobs, one per agent, in the customers' namespaces.
# OPENAI_API_KEY and the like: whatever the agents' providers need; NATS's login and the auth callout's seed: see
# nomad/nats.nomad.hcl (caravan nats-callout-keys makes the seed).
#   nomad var put -namespace default nomad/jobs/caravan NOMAD_TOKEN=<token of nomad/caravan-policy.hcl> \
#       CARAVAN_ADMIN_KEY=<admin api key> OPENAI_API_KEY=<key> \
#       CARAVAN_NATS_USER=caravan-control CARAVAN_NATS_PASSWORD=<password> CARAVAN_NATS_CALLOUT_SEED=<seed>
#   nomad job run nomad/nats.nomad.hcl
#   nomad job run -var caravan_venv=/opt/caravan nomad/caravan.nomad.hcl

variable "caravan_venv" {
  type        = string
  description = "A virtualenv with Caravan installed (pip install .), at the same path on every client."
  default     = "/opt/caravan"
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

job "caravan" {
  namespace   = "default"
  datacenters = var.datacenters
  type        = "service"

  meta {
    caravan_role = "control-plane"
  }

  group "control" {
    count = 1

    network {
      port "http" {
        static = 8080
      }
    }

    service {
      name     = "caravan-api"
      provider = "nomad"
      port     = "http"
      # GET /metrics (Prometheus' text format). Prometheus finds it with nomad_sd_configs, keeping this tag:
      #   relabel_configs: [{source_labels: [__meta_nomad_tags], regex: ".*,metrics,.*", action: keep}]
      tags = ["caravan", "metrics"]

      check {
        type     = "http"
        path     = "/readyz"
        interval = "10s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 5
      interval = "5m"
      delay    = "10s"
      mode     = "delay"
    }

    task "caravan" {
      driver = "raw_exec"

      config {
        command = "${var.caravan_venv}/bin/caravan"
        args    = ["serve"]
      }

      # NATS and Nomad addresses come from Nomad's own service catalog and agent.
      template {
        destination = "local/wiring.env"
        env         = true
        data        = <<-EOT
          {{ range nomadService "caravan-nats" }}NATS_URL=nats://{{ .Address }}:{{ .Port }}
          {{ end }}NOMAD_ADDR=http://{{ env "attr.unique.network.ip-address" }}:4646
        EOT
      }

      # Secrets: Nomad's token for Caravan, the admin key, the model keys agents need, its NATS login and the
      # auth callout's seed (agents' own NATS users).
      template {
        destination = "${NOMAD_SECRETS_DIR}/caravan.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/caravan" }}{{ range .Tuples }}{{ .K }}={{ .V | toJSON }}
          {{ end }}{{ end }}
        EOT
      }

      env {
        CARAVAN_SCHEDULER      = "nomad"
        CARAVAN_HTTP_HOST      = "0.0.0.0"
        CARAVAN_HTTP_PORT      = "${NOMAD_PORT_http}"
        CARAVAN_DATA_DIR       = "${NOMAD_ALLOC_DIR}/data"
        CARAVAN_AGENT_DRIVER   = "raw_exec"
        CARAVAN_AGENT_PYTHON   = "${var.caravan_venv}/bin/python"
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
