# NATS with JetStream for Caravan (task queues, event history, key-value stores), on a host volume so
# that its state survives a restart. Declare the volume in the client's config:
#   client {
#     host_volume "caravan-nats" {
#       path      = "/opt/caravan/nats"
#       read_only = false
#     }
#   }
# Its users (README, NATS users on a NATS of your own): Caravan's own, caravan-control, whose password is in this job's Variable,
# and every other login (each agent's own user, the watching user caravan-watch) asked of Caravan by NATS's auth
# callout, answered with the permissions of that user alone. The Variable (a task reads its own job's):
#   caravan nats-callout-keys    # prints CARAVAN_NATS_CALLOUT_SEED (for nomad/jobs/caravan) and its issuer
#   nomad var put -namespace default nomad/jobs/caravan-nats control_password=<password> callout_issuer=<issuer>
#   nomad job run nomad/nats.nomad.hcl
# NATS does not start until the Variable is there. Caravan's Variable nomad/jobs/caravan holds the same password
# (CARAVAN_NATS_USER=caravan-control CARAVAN_NATS_PASSWORD=<password>) and the seed.

job "caravan-nats" {
  namespace   = "default"
  datacenters = ["*"]
  type        = "service"

  group "nats" {
    count = 1

    volume "data" {
      type      = "host"
      source    = "caravan-nats"
      read_only = false
    }

    network {
      port "client" {
        static = 4222
      }
      port "monitor" {
        to = 8222
      }
    }

    service {
      name     = "caravan-nats"
      provider = "nomad"
      port     = "client"

      # NATS's own health, JetStream's included. No query string: Nomad's own checks sent its "?" as "%3F" (NATS
      # answers 404: the check fails for good) until the 1.4, 1.5 and 1.6 releases of July 2023
      # (hashicorp/nomad#17790).
      check {
        type     = "http"
        port     = "monitor"
        path     = "/healthz"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "nats" {
      driver = "docker"

      config {
        image = "nats:2.15-alpine"
        ports = ["client", "monitor"]
        args  = ["--config", "/secrets/nats.conf", "--jetstream", "--store_dir", "/data", "--http_port", "8222"]
      }

      # The users. caravan-control may do all but delete, purge or reconfigure the audit stream (as on the embedded
      # default: control/natsauth.py) and bypasses the callout, which it serves; every other login is asked of it.
      template {
        destination = "${NOMAD_SECRETS_DIR}/nats.conf"
        change_mode = "restart"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/caravan-nats" }}
          authorization {
            users: [
              {
                user: "caravan-control"
                password: {{ .control_password.Value | toJSON }}
                permissions: {
                  publish: {
                    allow: [">"]
                    deny: [
                      "$JS.API.STREAM.DELETE.CARAVAN_AUDIT"
                      "$JS.API.STREAM.PURGE.CARAVAN_AUDIT"
                      "$JS.API.STREAM.MSG.DELETE.CARAVAN_AUDIT"
                      "$JS.API.STREAM.UPDATE.CARAVAN_AUDIT"
                    ]
                  }
                  subscribe: { allow: [">"] }
                }
              }
            ]
            auth_callout {
              issuer: {{ .callout_issuer.Value | toJSON }}
              auth_users: ["caravan-control"]
            }
          }
          {{ end }}
        EOT
      }

      volume_mount {
        volume      = "data"
        destination = "/data"
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
