#!/usr/bin/env python3
"""A runnable example: an Auto Scaling group built in CDK, guarded by busy-guard, whose launch template
changes become instance refreshes that wait for the application's work.

    npx cdk synth --app "python3 examples/guarded_group/guarded_group_app.py" \
        -c exampleAmiId=ami-0123456789abcdef0 -c exampleRegion=eu-west-1

What is in the stack: a small VPC (two public subnets, no NAT gateway), a launch template whose
instance role carries the writer policy, a group of two with UpdatePolicy.instance_refresh
(launch before terminate), the busy table and the guard on that group. Change ``exampleAmiId`` and
deploy: CloudFormation answers the new launch template version with an instance refresh, and the
refresh waits at each instance the guard holds.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "infra"))

from aws_cdk import Annotations, App, Environment, Stack
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

from busy_guard_infra.application import add_nag_packs
from busy_guard_infra.config import GuardSettings
from busy_guard_infra.constructs.guard import BusyGuard
from busy_guard_infra.constructs.table import BusyTable
from busy_guard_infra.constructs.writer_policy import WriterPolicy

STACK_NAME = "GuardedGroupExample"
DEFAULT_REGION = "eu-west-1"
DEFAULT_AMI = "ami-0123456789abcdef0"
"""A placeholder: give a real arm64 AMI of your region with -c exampleAmiId=..."""

EXAMPLE_ONLY = (
    "An example stack that shows the guard on a group, kept minimal on purpose: a production group "
    "adds this hardening itself, and none of it changes how the guard holds its instances."
)


class GuardedGroupStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, region: str, ami_id: str) -> None:
        # The region is fixed (the AMI id belongs to it); the account is left to the deploy, so synth
        # looks nothing up: the VPC's zones are Fn::GetAZs.
        super().__init__(
            scope,
            construct_id,
            description="busy-guard example: a guarded group",
            env=Environment(region=region),
        )
        vpc = ec2.Vpc(
            self,
            "Vpc",
            max_azs=2,
            nat_gateways=0,
            subnet_configuration=[ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC)],
        )
        instance_role = iam.Role(self, "InstanceRole", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"))
        self.launch_template = ec2.LaunchTemplate(
            self,
            "LaunchTemplate",
            machine_image=ec2.MachineImage.generic_linux({region: ami_id}),
            instance_type=ec2.InstanceType("t4g.small"),
            role=instance_role,
            require_imdsv2=True,
            block_devices=[
                ec2.BlockDevice(
                    device_name="/dev/xvda",
                    volume=ec2.BlockDeviceVolume.ebs(8, encrypted=True),
                )
            ],
        )
        self.group = autoscaling.AutoScalingGroup(
            self,
            "Group",
            vpc=vpc,
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC),
            launch_template=self.launch_template,
            min_capacity=2,
            max_capacity=4,
            update_policy=autoscaling.UpdatePolicy.instance_refresh(
                strategy=autoscaling.InstanceRefreshStrategy.ROLLING,
                min_healthy_percentage=100,
                max_healthy_percentage=110,
            ),
        )
        table = BusyTable(self, "BusyTable", table_name="busy_guard_example.instance_busy").table
        self.guard = BusyGuard(
            self,
            "BusyGuard",
            table=table,
            groups=[self.group],
            settings=GuardSettings(max_wait_seconds=6 * 3600),
        )
        # A new table: the isolated scheme, each instance on its own item (the guard's default too).
        writers = WriterPolicy(self, "Writers", table=table, key_scheme=self.guard.settings.key_scheme)
        instance_role.add_managed_policy(writers.policy)
        Annotations.of(self).acknowledge_warning(
            "busy-guard:no-alarm-topic", "the example has no one to notify; pass alarm_topic in yours"
        )
        NagSuppressions.add_stack_suppressions(
            self,
            [
                NagPackSuppression(id=rule, reason=EXAMPLE_ONLY)
                for rule in ("AwsSolutions-VPC7", "AwsSolutions-AS3", "AwsSolutions-EC23")
            ],
        )


def build_app(context: Mapping[str, Any] | None = None, *, outdir: str | None = None) -> tuple[App, Stack]:
    app = App(context=dict(context or {}), outdir=outdir)
    region = str(app.node.try_get_context("exampleRegion") or DEFAULT_REGION)
    ami_id = str(app.node.try_get_context("exampleAmiId") or DEFAULT_AMI)
    stack = GuardedGroupStack(app, STACK_NAME, region=region, ami_id=ami_id)
    add_nag_packs(app)
    return app, stack


def main() -> int:
    app, _ = build_app()
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
