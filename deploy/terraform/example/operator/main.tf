# The operator's side: a tenant and an API key for it. Needs the admin key:
#
#   export OUTBOX_RELAY_ENDPOINT=http://127.0.0.1:8080 OUTBOX_RELAY_API_KEY=$ADMIN_KEY
#   terraform init && terraform apply
#   terraform output -raw api_key    # hand it to the tenant

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

# not the README quick start's "acme": the two can run one after the other on one `make run`
variable "tenant" {
  type    = string
  default = "globex"
}

resource "outboxrelay_tenant" "this" {
  name         = var.tenant
  display_name = "Globex Corporation"
}

resource "outboxrelay_tenant_api_key" "ci" {
  tenant      = outboxrelay_tenant.this.name
  description = "terraform"
}

output "api_key" {
  value     = outboxrelay_tenant_api_key.ci.key
  sensitive = true
}
