"""Virtual machines on libvirt: domain config objects, lifecycle, state events, the HA flag."""
