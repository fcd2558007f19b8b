variable "shop_dsn" {
  description = "The application database, without its password."
  type        = string
  default     = "postgresql://postgres@127.0.0.1:5432/shop"
}

variable "shop_password" {
  description = "The database password (write-only in the API; kept in this state)."
  type        = string
  default     = null
  sensitive   = true
}

variable "redis_url" {
  description = "Where the relay publishes (Redis Streams)."
  type        = string
  default     = "redis://127.0.0.1:6379/0"
}

variable "batch_size" {
  description = "Messages per relay batch."
  type        = number
  default     = 100
}
