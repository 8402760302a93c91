from twisted.application.service import ServiceMaker

Puppetha = ServiceMaker(
    "puppetha",
    "puppetha.tap",
    "Self-enrolling, highly available Puppet fleets on AWS",
    "puppetha",
)
