# NATS with JetStream for Caravan (task queues, event history, key-value stores), on a host volume so
# that its state survives a restart. Declare the volume in the client's config:
#   client {
#     host_volume "caravan-nats" {
#       path      = "/opt/caravan/nats"
#       read_only = false
#     }
#   }
#   nomad job run nomad/nats.nomad.hcl
# It has no users: every agent, and whatever reaches port 4222, may read and write all of Caravan's data (README,
# Running on Nomad). For trying Caravan on Nomad, on a network of your own.

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
        image = "nats:2.10-alpine"
        ports = ["client", "monitor"]
        args  = ["--jetstream", "--store_dir", "/data", "--http_port", "8222"]
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
