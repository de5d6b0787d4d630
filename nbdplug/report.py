"""Consistency checks: the report every format's check fills in.

Fields and exit codes follow `qemu-img check`, so scripts written for it
read ours: 0 clean, 1 check incomplete, 2 corruptions, 3 leaks only,
63 format cannot be checked.
"""

import dataclasses

EXIT_CLEAN = 0
EXIT_INCOMPLETE = 1
EXIT_CORRUPT = 2
EXIT_LEAKS = 3
EXIT_UNSUPPORTED = 63


@dataclasses.dataclass
class CheckReport:
    filename: str
    format: str
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    check_errors: int = 0
    image_end_offset: int = None
    total_clusters: int = None
    allocated_clusters: int = None
    fragmented_clusters: int = None
    compressed_clusters: int = None
    messages: list = dataclasses.field(default_factory=list)

    def corrupt(self, message):
        self.corruptions += 1
        self.messages.append("ERROR " + message)

    def leak(self, message):
        self.leaks += 1
        self.messages.append("Leaked " + message)

    def exit_code(self):
        if self.check_errors:
            return EXIT_INCOMPLETE
        if self.corruptions:
            return EXIT_CORRUPT
        if self.leaks:
            return EXIT_LEAKS
        return EXIT_CLEAN

    def to_json(self):
        """qemu-img check --output=json keys; absent where unknown."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "messages" or value is None:
                continue
            if field.name in ("leaks", "corruptions", "leaks_fixed",
                              "corruptions_fixed") and not value:
                continue
            out[field.name.replace("_", "-")] = value
        return out

    def human(self):
        lines = list(self.messages)
        if self.corruptions_fixed or self.leaks_fixed:
            lines.append(f"The following inconsistencies were found and "
                         f"repaired:\n\n    {self.leaks_fixed} leaked "
                         f"clusters\n    {self.corruptions_fixed} "
                         f"corruptions\n")
        if self.corruptions:
            lines.append(f"\n{self.corruptions} errors were found on the "
                         "image.\nData may be corrupted, or further writes "
                         "to the image may corrupt it.")
        if self.leaks:
            lines.append(f"\n{self.leaks} leaked clusters were found on the "
                         "image.\nThis means waste of disk space, but no "
                         "harm to data.")
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        if self.check_errors:
            lines.append(f"\n{self.check_errors} internal errors have "
                         "occurred during the check.")
        if self.allocated_clusters is not None and self.total_clusters:
            pct = 100.0 * self.allocated_clusters / self.total_clusters
            lines.append(f"{self.allocated_clusters}/{self.total_clusters} "
                         f"= {pct:.2f}% allocated")
        if self.image_end_offset is not None:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines)
