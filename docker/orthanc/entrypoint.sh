#!/bin/sh
# Write Orthanc's configuration from the environment, then run Orthanc in the foreground.
set -eu

: "${ORTHANC_USERNAME:?set ORTHANC_USERNAME (HTTP basic auth of the REST and DICOMweb API)}"
: "${ORTHANC_PASSWORD:?set ORTHANC_PASSWORD}"
aet="${ORTHANC_AET:-ORTHANC}"
config=/run/orthanc/orthanc.json
plugin="$(ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/lib/orthanc/libOrthancDicomWeb.so* 2>/dev/null | head -n 1)"
[ -n "$plugin" ] || { echo "the orthanc-dicomweb plugin is missing" >&2; exit 1; }

# JSON-escape the credentials (backslash and double quote) so that any password works.
escape() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'; }
umask 077
cat >"$config" <<JSON
{
  "Name": "convirt-orthanc",
  "StorageDirectory": "/var/lib/orthanc/db",
  "IndexDirectory": "/var/lib/orthanc/db",
  "HttpPort": 8042,
  "DicomPort": 4242,
  "DicomAet": "$(escape "$aet")",
  "RemoteAccessAllowed": true,
  "AuthenticationEnabled": true,
  "RegisteredUsers": {"$(escape "$ORTHANC_USERNAME")": "$(escape "$ORTHANC_PASSWORD")"},
  "Plugins": ["$plugin"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/"}
}
JSON
exec /usr/sbin/Orthanc "$config"
