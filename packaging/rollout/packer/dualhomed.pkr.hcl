# Packer template that bakes dualhomed into an AMI (docs/fleet.md). To add
# dualhomed to a template of your own, copy the two provisioners of the build
# block and bake-dualhomed.sh.
#
#   packer build -var source_ami=ami-... -var package=dist/dualhomed_1.2.3-1_amd64.deb .
#
# Packer 1.7 and later need the Amazon plugin first:
#   packer plugins install github.com/hashicorp/amazon
# CI validates this file with Debian's Packer 1.6.6 (`packer validate`), which
# has the builder built in (cmd/internal/rollout).

variable "source_ami" {
  type        = string
  description = "The AMI to start from, e.g. Debian 12 or Ubuntu 24.04 for a .deb, Amazon Linux 2023 for an .rpm."
}

variable "package" {
  type        = string
  description = "The dualhomed .deb or .rpm on the machine that runs packer."
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "ssh_username" {
  type    = string
  default = "admin"
}

source "amazon-ebs" "dualhomed" {
  ami_name      = "dualhomed-${formatdate("YYYYMMDD-hhmmss", timestamp())}"
  instance_type = "t3.micro"
  region        = var.region
  source_ami    = var.source_ami
  ssh_username  = var.ssh_username
}

build {
  sources = ["source.amazon-ebs.dualhomed"]

  # The package, then the install: enabled, not started, so that nothing of
  # the build instance's ENIs is configured while baking.
  provisioner "file" {
    source      = var.package
    destination = "/tmp/${basename(var.package)}"
  }

  provisioner "shell" {
    script           = "${path.root}/bake-dualhomed.sh"
    environment_vars = ["DUALHOMED_PACKAGE=/tmp/${basename(var.package)}"]
    execute_command  = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
  }
}
