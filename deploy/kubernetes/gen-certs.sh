#!/bin/sh
# TLS for the webhook without cert-manager: a private CA and a serving certificate for the webhook's
# Service name, stored as Secret sidecar-system/sidecar-webhook-tls, and the CA written into the
# MutatingWebhookConfiguration's caBundle. Re-run it to rotate (the webhook re-reads its files).
#   ./gen-certs.sh [DAYS]        needs openssl and kubectl (with rights to both objects)
set -eu
days="${1:-365}"
namespace=sidecar-system
service=sidecar-webhook
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
    -subj "/CN=sidecar-webhook-ca" -keyout "$work/ca.key" -out "$work/ca.crt"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$service.$namespace.svc" -keyout "$work/tls.key" -out "$work/tls.csr"
printf 'subjectAltName=DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local\nextendedKeyUsage=serverAuth\n' \
    "$service" "$namespace" "$service" "$namespace" > "$work/ext.cnf"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
    -days "$days" -extfile "$work/ext.cnf" -out "$work/tls.crt"

kubectl -n "$namespace" create secret tls sidecar-webhook-tls --cert "$work/tls.crt" --key "$work/tls.key" \
    --dry-run=client -o yaml | kubectl apply -f -
bundle="$(base64 < "$work/ca.crt" | tr -d '\n')"
kubectl patch mutatingwebhookconfiguration sidecar-injector --type json \
    -p "[{\"op\": \"add\", \"path\": \"/webhooks/0/clientConfig/caBundle\", \"value\": \"$bundle\"}]"
echo "sidecar-webhook-tls and the caBundle of sidecar-injector are in place (valid $days days)"
