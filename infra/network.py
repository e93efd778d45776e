"""VPC with public subnets for the load balancer and NAT, private subnets for everything else."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws


@dataclass
class NetworkArgs:
    cidr: str
    az_count: int
    single_nat_gateway: bool
    cluster_name: str
    """EKS and the load balancer controller find subnets by `kubernetes.io/cluster/<name>` tags."""
    tags: dict[str, str]


class Network(pulumi.ComponentResource):
    """Public subnets carry only the NLB and NAT gateways; nodes, EFS and Redis stay private."""

    vpc_id: pulumi.Output[str]
    public_subnet_ids: list[pulumi.Output[str]]
    private_subnet_ids: list[pulumi.Output[str]]

    def __init__(
        self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("switchyard:infra:Network", name, None, opts)
        self._name = name
        self._args = args
        child = pulumi.ResourceOptions(parent=self)

        self.vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=args.cidr,
            enable_dns_hostnames=True,  # EFS mount targets and EKS private endpoint need DNS
            enable_dns_support=True,
            tags={**args.tags, "Name": f"{name}-vpc"},
            opts=child,
        )
        # The default security group allows all traffic between its members; strip its rules so
        # nothing can rely on it by accident.
        aws.ec2.DefaultSecurityGroup(
            f"{name}-default-sg", vpc_id=self.vpc.id, tags=args.tags, opts=child
        )
        self.igw = aws.ec2.InternetGateway(
            f"{name}-igw", vpc_id=self.vpc.id, tags={**args.tags, "Name": f"{name}-igw"}, opts=child
        )
        azs = aws.get_availability_zones_output(state="available")
        self.azs = [azs.names[i] for i in range(args.az_count)]
        blocks = list(ipaddress.IPv4Network(args.cidr).subnets(new_prefix=20))
        public = self._create_public_subnets(blocks[: args.az_count])
        self.public_subnet_ids = [s.id for s in public]
        nats = self._create_nat_gateways(public)
        self.private_subnet_ids = self._create_private_subnets(blocks[8 : 8 + args.az_count], nats)
        self.vpc_id = self.vpc.id
        self.register_outputs(
            {
                "vpc_id": self.vpc_id,
                "public_subnet_ids": self.public_subnet_ids,
                "private_subnet_ids": self.private_subnet_ids,
            }
        )

    def _create_public_subnets(self, blocks: list[ipaddress.IPv4Network]) -> list[aws.ec2.Subnet]:
        child = pulumi.ResourceOptions(parent=self)
        table = aws.ec2.RouteTable(
            f"{self._name}-public-rt",
            vpc_id=self.vpc.id,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=self.igw.id)],
            tags={**self._args.tags, "Name": f"{self._name}-public"},
            opts=child,
        )
        subnets = []
        for i, block in enumerate(blocks):
            subnet = aws.ec2.Subnet(
                f"{self._name}-public-{i}",
                vpc_id=self.vpc.id,
                cidr_block=str(block),
                availability_zone=self.azs[i],
                map_public_ip_on_launch=False,  # only the NLB and NAT get public addresses
                tags={
                    **self._args.tags,
                    "Name": f"{self._name}-public-{i}",
                    "kubernetes.io/role/elb": "1",
                    f"kubernetes.io/cluster/{self._args.cluster_name}": "shared",
                },
                opts=child,
            )
            aws.ec2.RouteTableAssociation(
                f"{self._name}-public-{i}", subnet_id=subnet.id, route_table_id=table.id, opts=child
            )
            subnets.append(subnet)
        return subnets

    def _create_nat_gateways(self, public: list[aws.ec2.Subnet]) -> list[aws.ec2.NatGateway]:
        child = pulumi.ResourceOptions(parent=self, depends_on=[self.igw])
        count = 1 if self._args.single_nat_gateway else len(public)
        nats = []
        for i in range(count):
            eip = aws.ec2.Eip(
                f"{self._name}-nat-{i}",
                domain="vpc",
                tags={**self._args.tags, "Name": f"{self._name}-nat-{i}"},
                opts=child,
            )
            nats.append(
                aws.ec2.NatGateway(
                    f"{self._name}-nat-{i}",
                    allocation_id=eip.id,
                    subnet_id=public[i].id,
                    tags={**self._args.tags, "Name": f"{self._name}-nat-{i}"},
                    opts=child,
                )
            )
        return nats

    def _create_private_subnets(
        self,
        blocks: list[ipaddress.IPv4Network],
        nats: list[aws.ec2.NatGateway],
    ) -> list[pulumi.Output[str]]:
        child = pulumi.ResourceOptions(parent=self)
        ids = []
        for i, block in enumerate(blocks):
            # Each AZ egresses through its own NAT when there is one, so losing an AZ does not
            # cut the others off from ECR and the model hubs.
            nat = nats[i % len(nats)]
            table = aws.ec2.RouteTable(
                f"{self._name}-private-{i}",
                vpc_id=self.vpc.id,
                routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", nat_gateway_id=nat.id)],
                tags={**self._args.tags, "Name": f"{self._name}-private-{i}"},
                opts=child,
            )
            subnet = aws.ec2.Subnet(
                f"{self._name}-private-{i}",
                vpc_id=self.vpc.id,
                cidr_block=str(block),
                availability_zone=self.azs[i],
                tags={
                    **self._args.tags,
                    "Name": f"{self._name}-private-{i}",
                    "kubernetes.io/role/internal-elb": "1",
                    f"kubernetes.io/cluster/{self._args.cluster_name}": "shared",
                },
                opts=child,
            )
            aws.ec2.RouteTableAssociation(
                f"{self._name}-private-{i}",
                subnet_id=subnet.id,
                route_table_id=table.id,
                opts=child,
            )
            ids.append(subnet.id)
        return ids
