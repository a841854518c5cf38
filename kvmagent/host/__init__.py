"""Host resources beside VMs: facts (psutil, procfs, sysfs, DMI), hugepages, the docker engine."""
