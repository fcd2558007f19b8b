# A tenant's relay as code: its application database, a Redis Streams target, and the relay
# between them. The provider reads OUTBOX_RELAY_ENDPOINT and OUTBOX_RELAY_API_KEY (a tenant key).
#
#   export OUTBOX_RELAY_ENDPOINT=http://127.0.0.1:8080 OUTBOX_RELAY_API_KEY=...
#   terraform init && terraform apply

terraform {
  required_version = ">= 1.0"
  required_providers {
    outboxrelay = {
      source  = "outbox-relay/outboxrelay"
      version = "~> 0.1"
    }
  }
}

provider "outboxrelay" {}

resource "outboxrelay_database" "shop" {
  name      = "shop"
  dsn       = var.shop_dsn
  password  = var.shop_password
  provision = true # install the outbox table into the database
}

resource "outboxrelay_target" "events" {
  name   = "shop-events"
  kind   = "redis_streams"
  url    = var.redis_url
  maxlen = 100000
}

resource "outboxrelay_relay" "shop" {
  name          = "shop"
  database      = outboxrelay_database.shop.name
  target        = outboxrelay_target.events.name
  topic_mapping = { "*" = "shop:{topic}" }

  # the relay policy; every field left out keeps the service's default
  batch_size   = var.batch_size
  max_attempts = 5
}

output "relay_created_at" {
  value = outboxrelay_relay.shop.created_at
}
